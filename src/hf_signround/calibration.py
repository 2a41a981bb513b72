"""Calibration data: validate a dataset spec, load its texts, cut token windows.

A calibration *dataset* may be given as

* a list/tuple of strings,
* a path (str or ``os.PathLike``) to a text file or a folder of text files,
* a Hugging Face hub dataset name (``"name"`` or ``"name:config"``),
* a ``datasets.Dataset`` (anything with ``column_names``),
* token ids already cut into rows: a 2-D integer ``torch.Tensor`` of shape
  ``(n, seqlen)`` or a list of lists of ints.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["build_calibration", "check_dataset_spec", "is_token_ids", "load_texts"]

_PATH_PREFIXES = ("/", "./", "../", "~")
_PATH_SUFFIXES = (".txt", ".rst", ".md", ".json", ".jsonl")
_ACCEPTED = (
    "a list of strings, a path to a text file or folder, a hub dataset name "
    "('name' or 'name:config'), a datasets.Dataset, or token ids (a 2-D integer "
    "torch.Tensor of shape (n, seqlen) or a list of lists of ints)"
)
# Texts per tokenizer call: big enough for the fast tokenizer's batching to pay
# off, small enough that the progress bar moves.
_TOKENIZE_BATCH = 64


def looks_like_path(s: str) -> bool:
    return s.startswith(_PATH_PREFIXES) or s.lower().endswith(_PATH_SUFFIXES)


def _is_int(x: Any) -> bool:
    # bool is an int subclass but never a meaningful token id.
    return isinstance(x, int) and not isinstance(x, bool)


def is_token_ids(dataset: Any) -> bool:
    """Whether ``dataset`` is given as token ids (a tensor or a list of id lists); no validation."""
    if isinstance(dataset, torch.Tensor):
        return True
    return (
        isinstance(dataset, (list, tuple))
        and len(dataset) > 0
        and isinstance(dataset[0], (list, tuple, torch.Tensor))
    )


def _check_token_ids(dataset: Any) -> None:
    if isinstance(dataset, torch.Tensor):
        if dataset.dim() != 2:
            raise ValueError(
                f"token-id calibration data must be a 2-D tensor (n, seqlen), got shape "
                f"{tuple(dataset.shape)}; for a single sequence use ids.unsqueeze(0)"
            )
        if dataset.dtype.is_floating_point or dataset.dtype.is_complex or dataset.dtype == torch.bool:
            raise ValueError(
                f"token-id calibration tensor must have an integer dtype, got {dataset.dtype}; "
                "convert it with ids.long()"
            )
        if dataset.numel() == 0:
            raise ValueError(f"token-id calibration tensor is empty (shape {tuple(dataset.shape)})")
        if int(dataset.min()) < 0:
            raise ValueError("token-id calibration tensor contains negative ids")
        return
    for i, row in enumerate(dataset):
        if isinstance(row, torch.Tensor):
            if row.dim() != 1 or row.dtype.is_floating_point or row.dtype == torch.bool:
                raise ValueError(
                    f"dataset[{i}] must be a 1-D integer sequence of token ids, got a tensor of "
                    f"shape {tuple(row.shape)} and dtype {row.dtype}"
                )
            continue
        if not isinstance(row, (list, tuple)):
            raise TypeError(
                f"dataset[{i}] is a {type(row).__name__}, but dataset[0] is a list of token ids; "
                "pass either only lists of ints or only strings"
            )
        for j, tok in enumerate(row):
            if not _is_int(tok) or tok < 0:
                raise ValueError(
                    f"dataset[{i}][{j}] = {tok!r} ({type(tok).__name__}) is not a token id; "
                    "token-id rows must contain only non-negative ints"
                )


def check_dataset_spec(dataset: Any) -> None:
    """Cheaply validate a calibration dataset spec; raise ``TypeError``/``ValueError`` if bad.

    Does not tokenize or read files: only types, shapes and path existence are
    checked, so this is safe to call when a config is constructed. ``None`` is
    accepted (the caller decides on a default).
    """
    if dataset is None:
        return
    if is_token_ids(dataset):
        _check_token_ids(dataset)
        return
    if isinstance(dataset, (list, tuple)):
        if len(dataset) == 0:
            raise ValueError(
                "calibration dataset is an empty list: pass at least one text, "
                "or a path / hub dataset name instead"
            )
        for i, item in enumerate(dataset):
            if not isinstance(item, str):
                raise TypeError(
                    f"calibration dataset element [{i}] is a {type(item).__name__}, not a str: "
                    "a list dataset must contain only strings (or only lists of token ids)"
                )
        return
    if isinstance(dataset, os.PathLike):
        path = Path(dataset).expanduser()
        if not path.exists():
            raise ValueError(f"dataset path {str(dataset)!r} does not exist: fix the path")
        _check_file_or_dir(path, dataset)
        return
    if isinstance(dataset, str):
        if not dataset.strip():
            raise ValueError(
                "calibration dataset is an empty string: pass a path, a hub dataset name, "
                "or a list of strings"
            )
        path = Path(dataset).expanduser()
        if path.exists():
            _check_file_or_dir(path, dataset)
            return
        if looks_like_path(dataset):
            raise ValueError(
                f"dataset path {dataset!r} does not exist: fix the path, or pass a list of "
                "strings or a hub dataset name"
            )
        name, _, config = dataset.partition(":")
        if not name.strip() or (":" in dataset and not config.strip()):
            raise ValueError(
                f"hub dataset name {dataset!r} is malformed: use 'name' or 'name:config'"
            )
        return
    if hasattr(dataset, "column_names"):
        return
    raise TypeError(f"unsupported calibration dataset type {type(dataset).__name__}: pass {_ACCEPTED}")


def _check_file_or_dir(path: Path, spec: Any) -> None:
    if not (path.is_file() or path.is_dir()):
        raise ValueError(
            f"dataset path {str(spec)!r} exists but is neither a regular file nor a folder: "
            "pass a text file or a folder of text files"
        )


def _read_folder(folder: Path) -> list[str]:
    texts = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            logger.warning("skipping %s: not valid UTF-8", path)
            continue
        if not text.strip():
            continue
        texts.append(text)
    logger.info("read %d text files from %s", len(texts), folder)
    return texts


def _dataset_texts(ds: Any) -> list[str]:
    """The ``text`` column of a ``datasets.Dataset``, else its first string column."""
    columns = ds.column_names
    if isinstance(columns, dict):
        # A DatasetDict: calibration uses its training split.
        if "train" not in columns:
            raise ValueError(
                f"dataset has splits {sorted(columns)} but no 'train' split: pass one split, "
                "e.g. dataset['validation']"
            )
        ds = ds["train"]
        columns = ds.column_names
    columns = list(columns)
    if "text" in columns:
        return _as_strings(ds["text"], "text")
    features = getattr(ds, "features", None)
    for col in columns:
        if features is not None and col in features:
            dtype = getattr(features[col], "dtype", None)
            if dtype in ("string", "large_string"):
                return _as_strings(ds[col], col)
            continue
        values = ds[col]
        first = next((v for v in values if v is not None), None)
        if isinstance(first, str):
            return _as_strings(values, col)
    raise ValueError(
        f"dataset has no 'text' column and no string column (columns: {columns}): "
        "select or rename a text column first, e.g. ds.rename_column(<col>, 'text')"
    )


def _as_strings(values: Any, col: str) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if v is None:
            continue
        if not isinstance(v, str):
            raise ValueError(f"dataset column {col!r} row {i} is a {type(v).__name__}, not a str")
        out.append(v)
    return out


def _load_hub(spec: str) -> list[str]:
    name, _, config = spec.partition(":")
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported only when needed
    except ImportError as e:
        raise ImportError(
            f"loading the hub dataset {spec!r} needs the 'datasets' package: pip install datasets "
            "(or pass a list of strings or a path to a text file/folder instead)"
        ) from e
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:
        raise ValueError(
            f"could not load hub dataset {spec!r} (split 'train'): the hub could not be reached "
            f"or the name/config is wrong ({type(e).__name__}: {e}). A list of strings or a path "
            "to a text file or folder also works as calibration data."
        ) from e
    return _dataset_texts(ds)


def load_texts(dataset: Any) -> list[str]:
    """Load the calibration texts described by ``dataset`` (see module docstring).

    Raises ``ValueError`` if the result contains no non-blank text.
    """
    if dataset is None:
        raise ValueError(f"no calibration dataset given: pass {_ACCEPTED}")
    check_dataset_spec(dataset)
    if is_token_ids(dataset):
        raise TypeError(
            "dataset is already token ids, there are no texts to load: "
            "pass it to build_calibration directly"
        )
    if isinstance(dataset, (list, tuple)):
        texts = list(dataset)
    elif isinstance(dataset, (str, os.PathLike)) and Path(dataset).expanduser().exists():
        path = Path(dataset).expanduser()
        if path.is_dir():
            texts = _read_folder(path)
        else:
            try:
                texts = [path.read_text(encoding="utf-8")]
            except UnicodeDecodeError as e:
                raise ValueError(f"dataset file {str(path)!r} is not valid UTF-8 text") from e
    elif isinstance(dataset, str):
        texts = _load_hub(dataset)
    else:
        texts = _dataset_texts(dataset)
    if not any(t.strip() for t in texts):
        raise ValueError(
            f"dataset is empty: {_describe(dataset)} contains no non-blank text; "
            "pass some text to calibrate on"
        )
    return texts


def _describe(dataset: Any) -> str:
    if isinstance(dataset, (str, os.PathLike)):
        return repr(str(dataset))
    return f"the given {type(dataset).__name__}"


def _check_positive(name: str, value: Any) -> None:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _rows_from_ids(dataset: Any, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    _check_token_ids(dataset)
    if isinstance(dataset, torch.Tensor):
        n, width = dataset.shape
        if width < seqlen:
            raise ValueError(
                f"token-id calibration rows have {width} tokens but seqlen={seqlen}: "
                "lower seqlen or pass longer rows"
            )
        eligible = list(range(n))
        rows = dataset.to(torch.long)
    else:
        rows = [torch.as_tensor(r, dtype=torch.long) for r in dataset]
        eligible = [i for i, r in enumerate(rows) if r.numel() >= seqlen]
    if len(eligible) < nsamples:
        raise ValueError(
            f"need {nsamples} token-id rows of at least {seqlen} tokens, but only "
            f"{len(eligible)} of {len(dataset)} rows qualify: pass more/longer rows, "
            "or lower nsamples/seqlen"
        )
    pick = _seeded_pick(len(eligible), nsamples, seed)
    out = torch.stack([rows[eligible[int(k)]][:seqlen] for k in pick])
    logger.info("calibration: picked %d of %d token-id rows (seqlen %d)", nsamples, len(eligible), seqlen)
    return out.contiguous()


def _seeded_pick(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` distinct indices of ``range(n)`` chosen by ``seed``, in ascending order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def _tokenize_stream(texts: Sequence[str], tokenizer: Any) -> torch.Tensor:
    """Tokenize texts without special tokens and join them with EOS into one stream."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    batches = range(0, len(texts), _TOKENIZE_BATCH)
    for start in tqdm(batches, desc="tokenizing calibration texts", disable=len(batches) < 4, leave=False):
        batch = list(texts[start : start + _TOKENIZE_BATCH])
        # verbose=False: long documents legitimately exceed model_max_length here.
        ids_batch = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in ids_batch:
            if len(ids) == 0:
                continue
            if stream and eos is not None:
                stream.append(int(eos))
            stream.extend(ids)
    return torch.tensor(stream, dtype=torch.long)


def token_windows(stream: torch.Tensor, seqlen: int, needed: int, what: str, count_name: str) -> torch.Tensor:
    """Cut a 1-D token stream into consecutive non-overlapping (W, seqlen) windows; W >= needed or a ValueError
    that names the shortfall and the fix (``what`` names the text, ``count_name`` the knob)."""
    total = stream.numel() // seqlen
    if total < needed:
        raise ValueError(
            f"not enough {what} text: {stream.numel()} tokens available, {needed * seqlen} tokens needed "
            f"({count_name}={needed} x seqlen={seqlen}); pass more text, or lower {count_name}/seqlen"
        )
    return stream[: total * seqlen].view(total, seqlen)


def build_calibration(dataset: Any, tokenizer: Any, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Return a ``(nsamples, seqlen)`` LongTensor of calibration token windows.

    Token-id input: ``nsamples`` rows with at least ``seqlen`` tokens are picked
    by ``seed`` and truncated. Text input: all texts are tokenized without
    special tokens, joined with the tokenizer's EOS id into one stream, cut
    into consecutive non-overlapping ``seqlen`` windows, and ``nsamples`` of
    them are chosen without replacement (kept in stream order). Deterministic
    for fixed inputs.
    """
    _check_positive("nsamples", nsamples)
    _check_positive("seqlen", seqlen)
    if dataset is not None and is_token_ids(dataset):
        return _rows_from_ids(dataset, nsamples, seqlen, seed)
    if tokenizer is None:
        raise ValueError(
            "a tokenizer is needed to tokenize the calibration texts: "
            "pass tokenizer=AutoTokenizer.from_pretrained(...)"
        )
    texts = load_texts(dataset)
    stream = _tokenize_stream(texts, tokenizer)
    windows = token_windows(stream, seqlen, nsamples, "calibration", "nsamples")
    n_windows = len(windows)
    logger.info("calibration: %d texts -> %d tokens -> %d windows of %d tokens", len(texts), stream.numel(), n_windows, seqlen)
    return windows[_seeded_pick(n_windows, nsamples, seed)].clone()


def calibration_windows(config) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The windows a quantization with ``config`` reads: ``(calibration, scoring)``.

    Tuning reads ``nsamples`` windows of ``seqlen`` tokens; DeltaLoss scoring (``avg_bits``)
    ``sensitivity_nsamples`` of ``sensitivity_seqlen``, drawn with the same seed. Each is None
    when not needed.
    """
    if config.needs_calibration and config.dataset is None:
        raise ValueError(config.calibration_error())
    calibration = scoring = None
    if config.tunes:
        calibration = build_calibration(config.dataset, config.tokenizer, config.nsamples, config.seqlen, config.seed)
    if config.scores_on_data:
        scoring = build_calibration(config.dataset, config.tokenizer, config.sensitivity_nsamples,
                                    config.sensitivity_seqlen, config.seed)
    return calibration, scoring
