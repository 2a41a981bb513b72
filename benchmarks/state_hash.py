"""SHA-256 of SmolLM2's quantized state dict: compare two checkouts' pipelines bit for bit.

Run with each checkout's ``src`` first on the path; equal digests mean equal tensors, so every
quality row measured with one stands for the other::

    PYTHONPATH=/path/to/old/src python benchmarks/state_hash.py [--mixed]
    PYTHONPATH=src python benchmarks/state_hash.py [--mixed]

Short settings (4 tuning steps on 8 x 64 tokens, W2G64 sym; ``--mixed``: avg_bits 3.0 over
W2G64/W4G128) keep each run to a minute or two on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_signround import SignRoundV2Config
from hf_signround.assets import calibration_texts, smollm2_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixed", action="store_true", help="avg_bits 3.0 over W2G64 and W4G128")
    args = parser.parse_args()
    path = smollm2_path()
    kw = dict(bits=2, group_size=64, sym=True, iters=4, nsamples=8, seqlen=64, batch_size=4,
              dataset=calibration_texts(), tokenizer=AutoTokenizer.from_pretrained(path))
    if args.mixed:
        kw.update(avg_bits=3.0, bit_options=[(2, 64), (4, 128)], sensitivity_nsamples=4, sensitivity_seqlen=64)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=SignRoundV2Config(**kw))
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    print(digest.hexdigest())


if __name__ == "__main__":
    main()
