"""A script run as ``python benchmarks/x.py`` puts ``benchmarks/`` first on ``sys.path``, so a file there named
like an installed package hides it from every library that imports it (transformers >= 5.25 imports Hugging
Face's ``kernels`` package: a ``benchmarks/kernels.py`` broke every benchmark and ``gpu_check.py``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_no_benchmark_script_shadows_an_installed_module(monkeypatch):
    stems = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "__init__")
    assert "quality" in stems  # the glob found the scripts
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != BENCHMARKS])
    clashes = {}
    for stem in stems:
        spec = importlib.util.find_spec(stem) if stem not in sys.modules else sys.modules[stem].__spec__
        if spec is not None and spec.origin and Path(spec.origin).resolve().parent != BENCHMARKS:
            clashes[stem] = spec.origin
    assert not clashes, f"rename these benchmark scripts, they hide installed modules: {clashes}"
