"""Fuzz the loader of saved checkpoints: nothing damaged or edited may load different values silently.

Two small quantized checkpoints (asymmetric W4G32 with untied embeddings; mixed layers
with tied embeddings) are damaged one way per case: the safetensors file cut short, a bit
of its header length flipped, a byte of its JSON header changed, a tensor dropped,
reshaped or given another dtype, or a field of config.json's quantization_config edited
to another valid or invalid value. Each case must either raise an error that names the
checkpoint folder or the offending tensor, layer or field, or load logits bit-identical
to the undamaged checkpoint's (for a float tensor re-saved in another float dtype: the
logits of the values the file now holds, which transformers casts as it always does).

Out of scope: a flipped byte in a tensor's data (not its header) changes that value and
cannot be told from a real one without checksums; and ``quant_method`` is never edited:
with an unknown name transformers loads a float model with random weights and only warns,
before any hf_signround code runs.

``pytest -s`` prints the tally per category.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_signround import SignRoundV2Config
from tests.tiny import tiny_llama

IDS = torch.tensor([[1, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
WEIGHTS = "model.safetensors"
CATEGORIES = ("truncate", "length_bit", "header_byte", "drop", "reshape", "dtype", "config")
MIXED = {"model.layers.0.mlp.down_proj": {"bits": 8, "group_size": -1, "sym": True},
         "model.layers.1.self_attn.q_proj": {"bits": 2, "group_size": 48},  # 64 wide: groups of 48 and 16
         "model.layers.1.mlp.up_proj": {"bits": 3, "sym": True}}


@dataclass
class Case:
    category: str
    what: str  # printed when the case fails
    key: str | None = None  # the tensor or field a clear error may name instead of the folder
    expected_change: tuple[str, torch.Tensor] | None = None  # (parameter, values the file now holds)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """name -> (saved quantized checkpoint, its logits)."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(1)
    tied = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=1, pad_token_id=2)).eval()
    made = {}
    for name, model, cfg in [("untied", tiny_llama(), SignRoundV2Config(bits=4, group_size=32, iters=0)),
                             ("tied", tied, SignRoundV2Config(bits=4, group_size=32, iters=0, layer_config=MIXED))]:
        model.save_pretrained(root / f"{name}-float")
        quantized = AutoModelForCausalLM.from_pretrained(root / f"{name}-float", quantization_config=cfg)
        quantized.save_pretrained(root / name)
        made[name] = (root / name, logits(AutoModelForCausalLM.from_pretrained(root / name)))
    return made


# ----------------------------------------------------------------------------- damage
def truncate(folder: Path, rng: random.Random) -> Case:
    data = (folder / WEIGHTS).read_bytes()
    cut = rng.randrange(len(data))
    (folder / WEIGHTS).write_bytes(data[:cut])
    return Case("truncate", f"cut to {cut} of {len(data)} bytes")


def length_bit(folder: Path, rng: random.Random) -> Case:
    data = bytearray((folder / WEIGHTS).read_bytes())
    bit = rng.randrange(64)
    data[bit // 8] ^= 1 << (bit % 8)
    (folder / WEIGHTS).write_bytes(bytes(data))
    return Case("length_bit", f"header length bit {bit} flipped")


def header_byte(folder: Path, rng: random.Random) -> Case:
    data = bytearray((folder / WEIGHTS).read_bytes())
    length = struct.unpack("<Q", data[:8])[0]
    at = 8 + rng.randrange(length)
    old = data[at]
    data[at] = old ^ (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.choice([b for b in range(256) if b != old])
    (folder / WEIGHTS).write_bytes(bytes(data))
    context = bytes(data[max(8, at - 20) : at + 20])
    return Case("header_byte", f"header byte {at} {old:#x} -> {data[at]:#x} in ...{context!r}...")


def _rewrite(folder: Path, change) -> None:
    """Re-save the weights after ``change(tensors)``, keeping the file's metadata."""
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(folder / WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata=metadata)


def _pick(folder: Path, rng: random.Random) -> str:
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        return rng.choice(sorted(f.keys()))  # noqa: SIM118 - not iterable


def drop(folder: Path, rng: random.Random) -> Case:
    key = _pick(folder, rng)
    _rewrite(folder, lambda t: t.pop(key))
    return Case("drop", f"dropped {key}", key)


def reshape(folder: Path, rng: random.Random) -> Case:
    key = _pick(folder, rng)
    shape = list(load_file(str(folder / WEIGHTS))[key].shape)
    how = rng.choice(["same count", "fewer", "more"])

    def change(tensors):
        t = tensors[key]
        if how == "same count":  # e.g. (64, 128) -> (128, 64), (8192,) or (1, 8192); (64,) -> (1, 64)
            shapes = [t.reshape(new).shape for new in ([-1], [1, -1], shape[::-1])]
            tensors[key] = t.reshape(rng.choice([new for new in shapes if list(new) != shape]))
        elif how == "fewer":
            tensors[key] = t[:-1].clone()
        else:
            tensors[key] = torch.cat([t, t[:1]])

    _rewrite(folder, change)
    return Case("reshape", f"{key} {shape}: {how}", key)


SAME_SIZE = {torch.float32: [torch.int32, torch.uint32], torch.int32: [torch.float32, torch.uint32],
             torch.float16: [torch.bfloat16, torch.int16], torch.bfloat16: [torch.float16, torch.int16]}
CASTS = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]


def dtype(folder: Path, rng: random.Random) -> Case:
    key = _pick(folder, rng)
    t = load_file(str(folder / WEIGHTS))[key]
    if rng.random() < 0.5:  # what a damaged header does: the same bytes read as another dtype
        new = rng.choice(SAME_SIZE[t.dtype])
        _rewrite(folder, lambda ts: ts.update({key: ts[key].view(new)}))
        return Case("dtype", f"{key} {t.dtype} bytes read as {new}", key)
    new = rng.choice([d for d in CASTS if d != t.dtype])
    _rewrite(folder, lambda ts: ts.update({key: ts[key].to(new)}))
    case = Case("dtype", f"{key} {t.dtype} converted to {new}", key)
    if t.is_floating_point() and new.is_floating_point and key.rpartition(".")[2] not in ("qweight", "qzeros",
                                                                                           "scales"):
        case.expected_change = (key, t.to(new).to(t.dtype))  # transformers casts back what the file holds
    return case


FIELD_VALUES = {
    "bits": [2, 3, 4, 8, 5, 0, "4", None], "group_size": [-1, 16, 32, 33, 48, 64, 128, 0, -2, "32", None],
    "sym": [True, False, 1, None], "scale_dtype": ["float16", "bfloat16", "float32", "int8", None],
    "format_version": [0, 1, 2, "1", None], "backend": ["auto", "torch", "triton", "cuda", None],
    "modules_to_not_convert": [None, [], ["mlp.down_proj"], ["lm_head"], "x", [3]],
    "iters": [0, 1, 200, -1, "x"], "lr": [None, 0.01, -1, "x"], "seed": [0, 7, -3], "nsamples": [1, 0],
    "seqlen": [2, 1], "batch_size": [1, 0], "amp": [True, False, "yes"], "scale_search": [False, 2],
    "topk_exclusion": [None, True, "x"], "topk_ratio": [0.5, 2], "topk_mode": ["drop", "clip"],
    "avg_bits": [None, 3.0, 40], "bit_options": [None, [[2, 64]], [[5, 64]], "x"],
    "sensitivity_method": ["weight_error", "nope"], "sensitivity_nsamples": [4, 0], "tie_fused": [False, None],
    "realized_avg_bits": [None, 3.5], "device": [None, "cpu", "cuda", "nowhere"], "skip_nonfinite": [True, "x"],
    "layer_config": [{}, None, "x", []],
}


def config(folder: Path, rng: random.Random) -> Case:
    # quant_method is never edited: see the module docstring.
    path = folder / "config.json"
    full = json.loads(path.read_text())
    qc = full["quantization_config"]
    layers = qc["layer_config"]
    name = rng.choice(sorted(layers))
    how = rng.choice(["field", "field", "remove_field", "unknown_field", "remove_layer", "layer_value",
                      "layer_value", "remove_layer_key", "add_layer"])
    if how == "field":
        field = rng.choice(sorted(FIELD_VALUES))
        qc[field] = rng.choice(FIELD_VALUES[field])
        case = Case("config", f"{field} = {qc[field]!r}", field)
    elif how == "remove_field":
        field = rng.choice(sorted(k for k in qc if k != "quant_method"))
        del qc[field]
        case = Case("config", f"{field} removed", field)
    elif how == "unknown_field":
        qc["colour"] = "blue"
        case = Case("config", "unknown field colour added", "colour")
    elif how == "remove_layer":
        del layers[name]
        case = Case("config", f"layer_config[{name}] removed", name)
    elif how == "layer_value":
        key = rng.choice(["bits", "group_size", "sym"])
        layers[name][key] = rng.choice(FIELD_VALUES[key])
        case = Case("config", f"layer_config[{name}][{key}] = {layers[name][key]!r}", name)
    elif how == "remove_layer_key":
        key = rng.choice(sorted(layers[name]))
        del layers[name][key]
        case = Case("config", f"layer_config[{name}][{key}] removed", name)
    else:
        extra = rng.choice(["model.layers.0.mlp.nope", "lm_head", "model.embed_tokens", "model.layers.0"])
        layers[extra] = {"bits": 4, "group_size": 32, "sym": False}
        case = Case("config", f"layer_config[{extra}] added", extra)
    path.write_text(json.dumps(full))
    return case


DAMAGE = {"truncate": truncate, "length_bit": length_bit, "header_byte": header_byte, "drop": drop,
          "reshape": reshape, "dtype": dtype, "config": config}


# ----------------------------------------------------------------------------- the run
def expected_logits(case: Case, source: Path, reference: torch.Tensor) -> torch.Tensor:
    """The logits a correct load gives: the undamaged ones, unless the file now holds other values."""
    if case.expected_change is None:
        return reference
    model = AutoModelForCausalLM.from_pretrained(source)
    name, values = case.expected_change
    with torch.no_grad():
        model.get_parameter(name).copy_(values)
    return logits(model)


def run_case(rng: random.Random, source: Path, reference: torch.Tensor, work: Path) -> tuple[Case, str]:
    """Damage a copy of ``source`` one way and load it: returns the case and "error" or "exact"."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    case = DAMAGE[rng.choice(CATEGORIES)](work, rng)
    try:
        got = logits(AutoModelForCausalLM.from_pretrained(work))
    except Exception as err:  # noqa: BLE001 - any error is fine if it says where
        message = str(err)
        clear = str(work) in message or (case.key is not None and case.key in message)
        return case, "error" if clear else f"unclear error {type(err).__name__}: {message[:300]}"
    want = expected_logits(case, source, reference)
    return case, "exact" if torch.equal(got, want) else f"SILENT: loaded, logits off by {(got - want).abs().max():.3g}"


def fuzz(checkpoints, tmp_path: Path, cases: int, seed: int) -> None:
    tally: Counter = Counter()
    bad = []
    names = sorted(checkpoints)
    for i in range(cases):
        rng = random.Random(seed * 100_003 + i)
        name = names[i % len(names)]
        case, outcome = run_case(rng, *checkpoints[name], tmp_path / "case")
        tally[(case.category, outcome if outcome in ("error", "exact") else "BAD")] += 1
        if outcome not in ("error", "exact"):
            bad.append(f"case {i} ({name}, {case.category}: {case.what}): {outcome}")
    print(f"\n{cases} cases:", ", ".join(f"{c} {tally[(c, 'error')]} error / {tally[(c, 'exact')]} exact"
                                         + (f" / {tally[(c, 'BAD')]} BAD" if tally[(c, "BAD")] else "")
                                         for c in CATEGORIES))
    assert not bad, "\n".join(bad[:20])
    assert all(tally[(c, "error")] + tally[(c, "exact")] > 0 for c in CATEGORIES)  # every kind was tried


def test_damaged_checkpoints_fail_loudly_or_load_exactly(checkpoints, tmp_path):
    fuzz(checkpoints, tmp_path, cases=280, seed=0)


@pytest.mark.slow  # about 1000 loads
def test_damaged_checkpoints_fail_loudly_or_load_exactly_long(checkpoints, tmp_path):
    fuzz(checkpoints, tmp_path, cases=1000, seed=1)
