"""Serve a quantized model with a GPTQ engine: export, then load it with vLLM (GPU) or auto-round (CPU).

    python examples/serve_gptq.py [--out out/smollm2-gptq] [--prompt "def fib(n):"]

1. quantize SmolLM2-135M-Instruct (W4G64 symmetric: every GPTQ engine takes it; see
   docs/FORMAT.md for what each engine serves) and export the GPTQ v1 checkpoint;
2. with vLLM and a GPU, generate through ``vllm.LLM`` (the same folder works with
   ``vllm serve out/smollm2-gptq``);
3. otherwise load it on CPU with auto-round (``pip install auto-round``) through transformers
   and check its logits against ours.

The CLI does step 1 in one line:
``hf-signround quantize MODEL out/smollm2-gptq --bits 4 --group-size 64 --sym --iters 0 --format gptq``.
"""

import argparse
import importlib.util

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_signround import SignRoundV2Config
from hf_signround.assets import smollm2_path
from hf_signround.export import export_gptq

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default="out/smollm2-gptq")
parser.add_argument("--prompt", default="def fib(n):")
args = parser.parse_args()

path = smollm2_path()
tok = AutoTokenizer.from_pretrained(path)
ours = AutoModelForCausalLM.from_pretrained(path, quantization_config=SignRoundV2Config(
    bits=4, group_size=64, sym=True, iters=0))  # iters=0: round-to-nearest; give dataset= and iters to tune
export = export_gptq(ours, args.out)
tok.save_pretrained(args.out)
print(f"GPTQ checkpoint in {args.out}: {export.quantization_config['bits']}-bit, "
      f"group {export.quantization_config['group_size']}, {len(export.quantization_config['dynamic'])} dynamic rules")

if importlib.util.find_spec("vllm") and torch.cuda.is_available():
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.out, quantization="gptq", dtype="float16")
    out = llm.generate([args.prompt], SamplingParams(max_tokens=32, temperature=0))
    print("vLLM:", args.prompt + out[0].outputs[0].text)
elif importlib.util.find_spec("auto_round"):
    from transformers import AutoRoundConfig

    served = AutoModelForCausalLM.from_pretrained(args.out, quantization_config=AutoRoundConfig(
        backend="auto_round:torch_zp"), device_map="cpu", dtype=torch.float16)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ours(ids).logits.float(), served(ids).logits.float()
    print(f"auto-round (CPU, float16) vs ours: max |logit difference| {(a - b).abs().max():.3g} "
          f"(logits up to {a.abs().max():.3g})")
    text = served.generate(ids, max_new_tokens=24, do_sample=False)
    print("auto-round:", tok.decode(text[0], skip_special_tokens=True))
else:
    print("install vLLM (GPU) or auto-round (CPU) to serve it: pip install vllm | pip install auto-round")
