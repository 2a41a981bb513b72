"""Tests for hf_signround.calibration (tiny, offline word_tok)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tests.tiny import trained_word_tokenizer
from hf_signround.calibration import build_calibration, check_dataset_spec, is_token_ids, load_texts

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a small model learns to round weights with signed gradients",
    "calibration text is cut into windows of tokens",
    "every window has the same number of tokens",
]


@pytest.fixture(scope="module")
def word_tok() -> PreTrainedTokenizerFast:
    return trained_word_tokenizer(SENTENCES)


def n_words(texts: list[str]) -> int:
    return sum(len(t.split()) for t in texts)


# ---------------------------------------------------------------- check_dataset_spec


def test_spec_accepts_valid(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    check_dataset_spec(None)
    check_dataset_spec(["a", "b"])
    check_dataset_spec(("a",))
    check_dataset_spec(str(tmp_path / "a.txt"))
    check_dataset_spec(tmp_path / "a.txt")
    check_dataset_spec(tmp_path)
    check_dataset_spec("wikitext")
    check_dataset_spec("wikitext:wikitext-2-raw-v1")
    check_dataset_spec(torch.zeros(2, 8, dtype=torch.long))
    check_dataset_spec([[1, 2, 3], [4, 5]])


@pytest.mark.parametrize("spec", ["/no/such/file", "./missing", "../missing", "~/missing_x", "missing.txt", "x.jsonl"])
def test_spec_missing_path(spec: str) -> None:
    with pytest.raises(ValueError, match="dataset path .* does not exist"):
        check_dataset_spec(spec)


def test_spec_missing_pathlike(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        check_dataset_spec(tmp_path / "nope")


def test_spec_empty_list() -> None:
    with pytest.raises(ValueError, match="empty list"):
        check_dataset_spec([])


def test_spec_non_str_element() -> None:
    with pytest.raises(TypeError, match=r"element \[1\] is a int"):
        check_dataset_spec(["ok", 3])


def test_spec_bad_type() -> None:
    with pytest.raises(TypeError, match="unsupported calibration dataset type dict.*list of strings"):
        check_dataset_spec({"text": "x"})


def test_spec_bad_token_ids() -> None:
    with pytest.raises(ValueError, match="2-D"):
        check_dataset_spec(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="integer dtype"):
        check_dataset_spec(torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"dataset\[1\]\[0\]"):
        check_dataset_spec([[1, 2], ["a"]])
    with pytest.raises(TypeError, match=r"dataset\[1\] is a str"):
        check_dataset_spec([[1, 2], "a"])


def test_spec_accepts_dataset_like() -> None:
    class Fake:
        column_names = ["text"]

    check_dataset_spec(Fake())


# ---------------------------------------------------------------- load_texts


def test_load_list() -> None:
    assert load_texts(["a", "b"]) == ["a", "b"]


def test_load_file(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_text("some text\nmore", encoding="utf-8")
    assert load_texts(str(f)) == ["some text\nmore"]
    assert load_texts(f) == ["some text\nmore"]


def test_load_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.md").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "c.txt").write_text("  \n", encoding="utf-8")  # blank: skipped
    (tmp_path / "d.bin").write_bytes(b"\xff\xfe\x00\xc3")  # not UTF-8: skipped
    with caplog.at_level("WARNING", logger="hf_signround.calibration"):
        assert load_texts(tmp_path) == ["first", "second"]
    assert "d.bin" in caplog.text


def test_load_empty_results(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dataset is empty"):
        load_texts(["", "  "])
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="dataset is empty"):
        load_texts(tmp_path / "e.txt")
    with pytest.raises(ValueError, match="dataset is empty"):
        load_texts(tmp_path)


class FakeDataset:
    """Minimal stand-in for datasets.Dataset: column_names + column access."""

    def __init__(self, columns: dict[str, list]) -> None:
        self._columns = columns
        self.column_names = list(columns)

    def __getitem__(self, key: str) -> list:
        return self._columns[key]


def test_load_dataset_like() -> None:
    assert load_texts(FakeDataset({"id": [1, 2], "text": ["x", "y"]})) == ["x", "y"]
    assert load_texts(FakeDataset({"id": [1, 2], "body": ["p", "q"]})) == ["p", "q"]
    with pytest.raises(ValueError, match=r"no string column.*'id'"):
        load_texts(FakeDataset({"id": [1, 2]}))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_load_hub_without_datasets() -> None:
    with pytest.raises(ImportError, match="pip install datasets"):
        load_texts("some_org/some_dataset")


# ---------------------------------------------------------------- build_calibration


def test_build_from_list(word_tok: PreTrainedTokenizerFast) -> None:
    texts = SENTENCES * 3
    out = build_calibration(texts, word_tok, nsamples=4, seqlen=8, seed=0)
    assert out.shape == (4, 8) and out.dtype == torch.long
    # The stream is the texts' ids joined by EOS; every selected row is one of its windows.
    eos = word_tok.eos_token_id
    stream: list[int] = []
    for t in texts:
        if stream:
            stream.append(eos)
        stream.extend(word_tok(t, add_special_tokens=False)["input_ids"])
    assert len(stream) == n_words(texts) + len(texts) - 1
    windows = torch.tensor(stream[: len(stream) // 8 * 8]).view(-1, 8)
    rows = [next(i for i in range(len(windows)) if torch.equal(windows[i], r)) for r in out]
    assert rows == sorted(rows) and len(set(rows)) == 4
    assert eos in out  # separators made it into the stream
    assert word_tok.unk_token_id not in out


def test_build_file_and_folder(word_tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    text = " ".join(SENTENCES * 2)
    (tmp_path / "one.txt").write_text(text)
    from_file = build_calibration(str(tmp_path / "one.txt"), word_tok, 3, 10, seed=1)
    from_list = build_calibration([text], word_tok, 3, 10, seed=1)
    assert torch.equal(from_file, from_list)
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(SENTENCES[0])
    (folder / "sub" / "b.txt").write_text(SENTENCES[1])
    out = build_calibration(folder, word_tok, 1, 10, seed=0)
    assert torch.equal(out, build_calibration(SENTENCES[:2], word_tok, 1, 10, seed=0))


def test_build_deterministic_and_seeded(word_tok: PreTrainedTokenizerFast) -> None:
    texts = SENTENCES * 20  # ~400 tokens -> 100 windows of 4
    a = build_calibration(texts, word_tok, 8, 4, seed=123)
    b = build_calibration(texts, word_tok, 8, 4, seed=123)
    c = build_calibration(texts, word_tok, 8, 4, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_build_from_token_ids() -> None:
    ids = torch.arange(60).view(6, 10)
    out = build_calibration(ids, None, nsamples=3, seqlen=7, seed=0)
    assert out.shape == (3, 7) and out.dtype == torch.long
    starts = out[:, 0].tolist()
    assert starts == sorted(starts) and len(set(starts)) == 3
    for row in out:
        assert torch.equal(row, ids[int(row[0]) // 10, :7])
    assert torch.equal(out, build_calibration(ids, None, 3, 7, seed=0))
    assert torch.equal(build_calibration(ids.int(), None, 3, 7, seed=0), out)


def test_build_from_token_id_lists() -> None:
    rows = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11]]
    out = build_calibration(rows, None, nsamples=2, seqlen=4, seed=0)
    assert out.tolist() == [[1, 2, 3, 4], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="need 3 token-id rows of at least 4 tokens.*only 2"):
        build_calibration(rows, None, nsamples=3, seqlen=4, seed=0)


def test_build_token_ids_too_short() -> None:
    with pytest.raises(ValueError, match="rows have 5 tokens but seqlen=8"):
        build_calibration(torch.zeros(4, 5, dtype=torch.long), None, 2, 8, seed=0)
    with pytest.raises(ValueError, match="need 5 token-id rows"):
        build_calibration(torch.zeros(4, 8, dtype=torch.long), None, 5, 8, seed=0)


def test_build_missing_tokenizer() -> None:
    with pytest.raises(ValueError, match=r"a tokenizer is needed.*AutoTokenizer\.from_pretrained"):
        build_calibration(["text"], None, 1, 4, seed=0)


def test_build_not_enough_text(word_tok: PreTrainedTokenizerFast) -> None:
    n = len(SENTENCES[0].split())  # 9 tokens
    with pytest.raises(ValueError, match=rf"{n} tokens available, 20 tokens needed.*more text.*lower nsamples/seqlen"):
        build_calibration([SENTENCES[0]], word_tok, nsamples=2, seqlen=10, seed=0)


def test_build_errors(word_tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty list"):
        build_calibration([], word_tok, 1, 4, seed=0)
    with pytest.raises(TypeError, match=r"element \[0\] is a bytes"):
        build_calibration([b"x"], word_tok, 1, 4, seed=0)
    with pytest.raises(ValueError, match="does not exist"):
        build_calibration(str(tmp_path / "missing.txt"), word_tok, 1, 4, seed=0)
    with pytest.raises(TypeError, match="unsupported calibration dataset type int"):
        build_calibration(42, word_tok, 1, 4, seed=0)
    with pytest.raises(ValueError, match="nsamples must be a positive int"):
        build_calibration(["x"], word_tok, 0, 4, seed=0)


def test_is_token_ids() -> None:
    assert is_token_ids(torch.zeros(1, 2, dtype=torch.long))
    assert is_token_ids([[1, 2]])
    assert not is_token_ids(["a"])
    assert not is_token_ids([])
    assert not is_token_ids("a.txt")
    assert not is_token_ids(None)
