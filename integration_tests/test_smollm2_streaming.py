"""The streaming quantizer on the real SmolLM2-135M-Instruct, mixed precision: the same tensors as
from_pretrained + save_pretrained, bit for bit (the DeltaLoss scoring and the allocation walk the
same blocks the same way)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_signround import SignRoundV2Config
from hf_signround.assets import calibration_texts
from hf_signround.streaming import quantize_checkpoint


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 - not iterable
    return out


@pytest.mark.slow
def test_streaming_at_three_bits_matches_from_pretrained(smollm2_dir, smollm2_tokenizer, tmp_path):
    def config():  # a few short windows and tuning steps keep it to minutes on 2 cores
        return SignRoundV2Config(bits=4, group_size=128, sym=True, avg_bits=3.0, bit_options=[(2, 64), (4, 128)],
                                 iters=2, nsamples=8, seqlen=64, batch_size=4, sensitivity_nsamples=4,
                                 sensitivity_seqlen=64, dataset=calibration_texts(), tokenizer=smollm2_tokenizer)

    resident = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=config())
    resident.save_pretrained(tmp_path / "resident")
    result = quantize_checkpoint(smollm2_dir, tmp_path / "streamed", config())
    assert result.plan == resident.hf_quantizer.result.plan
    assert {s.bits for s in result.plan.values()} == {2, 4} and 2.9 < result.realized_avg_bits <= 3.0
    streamed, expected = tensors(tmp_path / "streamed"), tensors(tmp_path / "resident")
    assert streamed.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(streamed[k], expected[k])] == []
