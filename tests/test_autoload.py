"""Registration with transformers: from an installed wheel without any import, and by a light `import hf_signround`."""

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


def fresh_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter without site processing (so no .pth hook runs) that imports this
    tree's hf_signround, with the environment's site-packages on sys.path as plain folders."""
    import site

    prelude = f"import sys; sys.path[:0] = [{str(ROOT / 'src')!r}]; sys.path.extend({site.getsitepackages()!r})\n"
    return subprocess.run([sys.executable, "-S", "-c", prelude + textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)


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


def test_importing_the_package_loads_neither_torch_nor_transformers(tmp_path):
    done = fresh_python("""
        import hf_signround
        assert hf_signround.__file__.startswith(sys.path[0]), hf_signround.__file__
        heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        assert not heavy, f"import hf_signround imported {heavy}"
        assert "QuantLinear" in dir(hf_signround) and "register" in hf_signround.__all__
    """, tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("imports", [
    "import hf_signround\nfrom transformers import AutoModelForCausalLM",  # the documented order
    "from transformers import AutoModelForCausalLM\nimport hf_signround",  # registry loaded first: registers at once
    "import hf_signround.quantize\nfrom transformers import AutoModelForCausalLM",  # the registry loads mid-import
    "from hf_signround import SignRoundV2Config\nfrom transformers import AutoModelForCausalLM",
])
def test_importing_the_package_registers_the_plugin(imports, llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=SignRoundV2Config(iters=0, group_size=32))
    model.save_pretrained(tmp_path / "ckpt")
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    done = fresh_python(imports + f"""
import torch
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r})
assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear", "loaded as a float model"
with torch.no_grad():
    torch.save(model(input_ids=torch.tensor({ids.tolist()!r})).logits, {str(tmp_path / "out.pt")!r})
""", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "could not register" not in done.stderr
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_public_names_resolve_to_their_modules():
    import hf_signround
    from hf_signround import config, hf_quantizer, qlinear, quantize

    assert hf_signround.SignRoundV2Config is config.SignRoundV2Config
    assert hf_signround.SignRoundV2HfQuantizer is hf_quantizer.SignRoundV2HfQuantizer
    assert hf_signround.register is hf_quantizer.register
    assert hf_signround.QuantLinear is qlinear.QuantLinear and hf_signround.quantize_model is quantize.quantize_model
    with pytest.raises(AttributeError, match="module 'hf_signround' has no attribute 'nothing_here'"):
        hf_signround.nothing_here  # noqa: B018
