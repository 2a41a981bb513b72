"""A saved checkpoint reloads without `import hf_signround`, from an installed wheel."""

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_signround import SignRoundV2Config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)], check=True)
    (path,) = out.glob("hf_signround-*.whl")
    return path


def test_wheel_ships_the_autoload_hook(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_signround_autoload.pth" in names and "hf_signround_autoload.py" in names


def test_reload_in_a_fresh_interpreter_without_import(wheel, llama_dir, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=SignRoundV2Config(iters=0, group_size=32))
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    # -S: no site processing, so only the wheel's .pth (via addsitedir) can register the plug-in;
    # the environment's site-packages are put on sys.path as plain folders for torch/transformers.
    import site

    child = textwrap.dedent(f"""
        import sys, site
        sys.path.extend({site.getsitepackages()!r})
        site.addsitedir({str(target)!r})
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r})
        assert "hf_signround" in sys.modules, "not registered"
        assert sys.modules["hf_signround"].__file__.startswith({str(target)!r})
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor({ids.tolist()!r})).logits, {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-S", "-c", child], check=True, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
