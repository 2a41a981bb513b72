"""The ``hf-signround`` command line: every command run as a real process, exit codes and messages.

Each process pays torch + transformers start-up (~6 s on 2 cores), so the error paths that
need no model are also checked in-process through ``main()``, the function the console
script calls.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_signround import SignRoundV2Config
from hf_signround.cli import EXIT_INPUT, EXIT_USAGE, build_parser, main
from hf_signround.config import SENSITIVITY_METHODS
from hf_signround.evaluation import heldout_windows, perplexity
from hf_signround.export import export_gptq
from hf_signround.inspection import inspect_checkpoint

IDS = torch.tensor([[1, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
SRC = Path(__file__).resolve().parents[1] / "src"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_signround.cli", "-q", *map(str, args)], capture_output=True,
                          text=True, timeout=600, check=False, env={**os.environ, **(env or {})})


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(corpus))
    return path


def test_console_script_help_lists_every_option_with_its_default():
    script = shutil.which("hf-signround")
    if script is None:
        pytest.skip("the console script is not installed: pip install -e .")
    out = subprocess.run([script, "quantize", "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    helps: dict[str, str] = {}  # option -> its help text, wrapped lines joined
    for line in out.stdout.split("options:", 1)[1].splitlines():
        entry = re.match(r"  (?:-\w, )?--([\w-]+)(.*)", line)
        if entry:
            option = entry[1]
            helps[option] = entry[2]
        elif helps:
            helps[option] += " " + line.strip()
    helps = {k: " ".join(v.split()) for k, v in helps.items()}
    defaults = SignRoundV2Config()
    for option, default in [("bits", defaults.bits), ("group-size", defaults.group_size), ("iters", defaults.iters),
                            ("nsamples", defaults.nsamples), ("seqlen", defaults.seqlen), ("seed", defaults.seed),
                            ("avg-bits", None), ("bit-options", None), ("dataset", None), ("device", None),
                            ("sensitivity-method", defaults.sensitivity_method), ("format", "signround")]:
        assert helps[option].endswith(f"(default: {default})"), helps[option]
    for option in ("sym", "asym", "device-map", "offload-folder", "keep", "dtype"):
        assert option in helps
    # every scorer the config accepts can be chosen on the command line
    for method in SENSITIVITY_METHODS:
        assert method in out.stdout, method
    assert helps["asym"] == "asymmetric quantization with stored zero points (the default)"


def test_help_imports_neither_torch_nor_transformers():
    """--help answers at once: building the parser loads no heavy module (those take seconds)."""
    child = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(SRC)!r})
        from hf_signround.cli import main
        for argv in (["--help"], ["quantize", "--help"], ["eval", "--help"], ["inspect", "--help"],
                     ["export", "--help"]):
            try:
                main(argv)
            except SystemExit as done:
                assert done.code == 0, (argv, done.code)
        heavy = sorted(m for m in ("torch", "transformers", "accelerate") if m in sys.modules)
        assert not heavy, f"--help imported {{heavy}}"
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "usage: hf-signround export" in done.stdout


def test_option_defaults_are_the_config_signature():
    import inspect

    from hf_signround import cli, config

    params = inspect.signature(SignRoundV2Config.__init__).parameters.values()
    assert cli._config_defaults() == {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    assert cli._config_source()[1]["SENSITIVITY_METHODS"] == config.SENSITIVITY_METHODS


@pytest.mark.parametrize("argv", [["--debug", "-q", "inspect", "x"], ["inspect", "x", "--debug", "-q"],
                                  ["--debug", "inspect", "x", "-q"], ["quantize", "m", "o", "--quiet", "--debug"],
                                  ["eval", "m", "-q", "--debug"], ["export", "a", "b", "--debug", "--quiet"]])
def test_logging_options_go_before_or_after_the_command(argv):
    args = build_parser().parse_args(argv)
    assert args.debug is True and args.quiet is True


def test_logging_options_default_off():
    args = build_parser().parse_args(["inspect", "x"])
    assert args.debug is False and args.quiet is False


def test_debug_after_the_command_shows_the_traceback(tmp_path, monkeypatch, capsys):
    import hf_signround.cli as cli

    def broken(args):
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(cli, "cmd_inspect", broken)
    assert main(["inspect", str(tmp_path)]) == 1
    assert "failed: RuntimeError: something unexpected (run with --debug for the traceback)" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="something unexpected"):
        main(["inspect", str(tmp_path), "--debug"])


def test_quantize_and_inspect(llama_dir, tmp_path):
    out = tmp_path / "w3"
    done = run("quantize", llama_dir, out, "--bits", 3, "--group-size", 32, "--iters", 0)
    assert done.returncode == 0, done.stderr
    assert "quantized 14 layers (14 W3G32 asym), realised 3.594 bits/weight" in done.stdout
    # the same as quantizing in Python, and reloadable without hf_signround-specific code
    cfg = SignRoundV2Config(bits=3, group_size=32, sym=False, iters=0)
    ours = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), logits(ours))
    assert AutoTokenizer.from_pretrained(out)("the model")["input_ids"]

    shown = run("inspect", out, "--json")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["format"] == "hf_signround" and summary["layers"] == 14 and summary["params"] == 73728
    assert summary["avg_bits"] == 3 + (16 + 3) / 32  # codes + fp16 scale + 3-bit zero per group of 32
    row = summary["per_layer"]["model.layers.0.mlp.down_proj"]
    assert (row["bits"], row["group_size"], row["sym"], row["out_features"], row["in_features"]) == (3, 32, False, 64, 128)


def test_quantize_mixed_bits_to_an_average(llama_dir, tmp_path):
    out = tmp_path / "mixed"
    done = run("quantize", llama_dir, out, "--iters", 0, "--sym", "--avg-bits", 3, "--bit-options", "2:32,4:32",
               "--sensitivity-method", "weight_error")
    assert done.returncode == 0, done.stderr
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["avg_bits"] == 3 and saved["bit_options"] == [[2, 32], [4, 32]]
    assert {spec["bits"] for spec in saved["layer_config"].values()} == {2, 4}
    allocation = json.loads((out / "allocation.json").read_text())
    assert allocation["target_avg_bits"] == 3 and set(allocation["layers"]) == set(saved["layer_config"])
    summary = inspect_checkpoint(out)
    # the average measured on the packed tensors is the one the allocation recorded, under the target
    assert math.isclose(summary["avg_bits"], saved["realized_avg_bits"], abs_tol=1e-6)
    assert summary["avg_bits"] <= 3


def test_quantize_to_gptq_and_export(llama_dir, tmp_path):
    done = run("quantize", llama_dir, tmp_path / "gptq", "--bits", 4, "--group-size", 32, "--iters", 0,
               "--format", "gptq")
    assert done.returncode == 0, done.stderr
    assert "wrote gptq checkpoint" in done.stdout
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["group_size"]) == ("gptq", 4, 32)

    # `export` rewrites a saved hf_signround checkpoint: the same files as exporting in Python
    model = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=SignRoundV2Config(bits=4, group_size=32, iters=0))
    model.save_pretrained(tmp_path / "ours")
    export_gptq(model, tmp_path / "python")
    done = run("export", tmp_path / "ours", tmp_path / "cli")
    assert done.returncode == 0, done.stderr
    for name in ("model.safetensors", "quantize_config.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "python" / name).read_bytes()
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == (tmp_path / "gptq" / "model.safetensors").read_bytes()
    summary = inspect_checkpoint(tmp_path / "cli")
    assert summary["format"] == "gptq" and summary["schemes"] == {"W4G32 asym": 14}
    assert summary["regrouped"] == {} and "written with group size" not in done.stdout  # G32 divides 64 and 128


def test_eval(llama_dir, corpus_file, tokenizer):
    done = run("eval", llama_dir, "--dataset", corpus_file, "--windows", 4, "--seqlen", 32, "--max-new-tokens", 4,
               "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    windows = heldout_windows(tokenizer, [corpus_file.read_text()], n_windows=4, seqlen=32)
    expected = perplexity(AutoModelForCausalLM.from_pretrained(llama_dir), windows)
    assert math.isclose(result["perplexity"], expected, rel_tol=1e-6)
    assert result["tokens_per_second"] > 0


def test_eval_prints_the_perplexity_before_generating(llama_dir, corpus_file, capsys, monkeypatch):
    """A perplexity is never lost to a Ctrl-C during the speed measurement: it is out before generation starts."""
    from hf_signround import evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "tokens_per_second", interrupted)
    args = ["eval", str(llama_dir), "--dataset", str(corpus_file), "--windows", "4", "--seqlen", "32"]
    assert main(args) == 130
    out = capsys.readouterr()
    assert re.fullmatch(rf"perplexity \d+\.\d{{3}} on 4 x 32 tokens of {re.escape(str(corpus_file))}\n", out.out), out.out
    assert out.err.endswith("hf-signround eval: interrupted\n")

    monkeypatch.setattr(evaluation, "tokens_per_second", lambda *a, **kw: 12.345)
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "generation 12.3 tokens/s (32 new tokens, greedy, after 'def fibonacci(n):')"


@pytest.mark.parametrize("quiet", [False, True])
def test_eval_json_is_one_document_with_results_on_stderr_as_they_come(llama_dir, corpus_file, capsys, monkeypatch,
                                                                        quiet):
    from hf_signround import evaluation

    monkeypatch.setattr(evaluation, "tokens_per_second", lambda *a, **kw: 12.345)
    args = ["eval", str(llama_dir), "--dataset", str(corpus_file), "--windows", "4", "--seqlen", "32", "--json"]
    assert main([*args, *(["-q"] if quiet else [])]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)  # stdout is the JSON document alone
    assert result["tokens_per_second"] == 12.345
    results_on_stderr = [line for line in out.err.splitlines() if line.startswith(("perplexity ", "generation "))]
    assert results_on_stderr == ([] if quiet else [f"perplexity {result['perplexity']:.3f} on 4 x 32 tokens of "
                                                   f"{corpus_file}", "generation 12.3 tokens/s (32 new tokens, "
                                                   "greedy, after 'def fibonacci(n):')"])


def test_errors_exit_with_their_codes_through_the_process(tmp_path):
    done = run("quantize", "some/model", tmp_path / "out", "--bits", 5)  # fails before loading anything
    assert done.returncode == EXIT_USAGE
    assert "hf-signround quantize: error: bits=5 is not supported: choose one of 2, 3, 4, 8" in done.stderr
    done = run("quantize", "nobody/no-such-model-here", tmp_path / "out", "--iters", 0, env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == EXIT_INPUT
    assert "hf-signround quantize: error: cannot load model 'nobody/no-such-model-here'" in done.stderr


@pytest.mark.parametrize("argv,code,message", [
    (["quantize", "{llama}", "{tmp}/o", "--iters", "5"], EXIT_USAGE,
     "--iters 5 tunes on calibration text (and --avg-bits scores on it): pass --dataset"),
    (["quantize", "{llama}", "{tmp}/o", "--iters", "0", "--group-size", "0"], EXIT_USAGE,
     "group_size=0 is not valid: use a positive int (e.g. 32, 64, 128), or -1"),
    (["quantize", "{llama}", "{tmp}/o", "--iters", "0", "--avg-bits", "3", "--bit-options", "2:32,3:32,2:32"],
     EXIT_USAGE, "lists an option twice"),
    (["quantize", "{tmp}/empty", "{tmp}/o", "--iters", "0"], EXIT_INPUT, "has no config.json: give a model folder"),
    (["quantize", "{tmp}/missing.gguf", "{tmp}/o", "--iters", "0"], EXIT_INPUT, "{tmp}/missing.gguf not found: give a model folder, a .gguf file"),
    (["inspect", "{tmp}/nowhere"], EXIT_INPUT, "{tmp}/nowhere holds no config.json"),
    (["inspect", "{llama}"], EXIT_USAGE, "holds an unquantized model (config.json has no quantization_config)"),
    (["export", "{llama}", "{tmp}/o"], EXIT_USAGE, "is not an hf_signround checkpoint"),
    (["export", "{tmp}/nope", "{tmp}/o"], EXIT_INPUT,
     "hf-signround export: error: {tmp}/nope not found: give the folder of a checkpoint saved by"),
    (["export", "{tmp}/empty", "{tmp}/o"], EXIT_INPUT, "{tmp}/empty holds no config.json"),
    (["quantize", "{llama}", "{tmp}/o", "--iters", "5", "--dataset", "{tmp}/nope.txt"], EXIT_INPUT,
     "hf-signround quantize: error: dataset {tmp}/nope.txt not found: give a text file or folder, a hub dataset "
     "name, or one of pydocs, pydocs-heldout"),
    (["quantize", "{llama}", "{llama}", "--iters", "0"], EXIT_USAGE,
     "hf-signround quantize: error: OUT {llama} is the input {llama}: writing there would destroy the input; "
     "choose another folder for OUT"),
    (["quantize", "{llama}", "{llama}/q", "--iters", "0", "--overwrite"], EXIT_USAGE,
     "OUT {llama}/q lies inside the input {llama}: choose a folder outside it for OUT"),
    (["eval", "{tmp}/empty"], EXIT_INPUT, "has no config.json"),
    (["eval", "{tmp}/nowhere"], EXIT_INPUT, "{tmp}/nowhere not found: give a model folder"),
])
def test_error_messages(llama_dir, tmp_path, capsys, argv, code, message):
    (tmp_path / "empty").mkdir()
    fill = {"llama": str(llama_dir), "tmp": str(tmp_path)}
    assert main(["-q", *[a.format(**fill) for a in argv]]) == code
    err = capsys.readouterr().err
    assert message.format(**fill) in err, err


def test_bad_bit_options_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "m", "o", "--bit-options", "2-64"])
    assert exit_info.value.code == EXIT_USAGE
    assert "'2-64' is not BITS:GROUP_SIZE; write the candidates as e.g. 2:64,4:128" in capsys.readouterr().err


def test_low_memory_quantize_writes_the_same_checkpoint(llama_dir, tmp_path, capsys):
    common = ["-q", "quantize", str(llama_dir), "--iters", "0", "--bits", "3", "--group-size", "32"]
    assert main([*common[:3], str(tmp_path / "streamed"), *common[3:], "--low-memory", "--max-shard-size", "30KB"]) == 0
    assert main([*common[:3], str(tmp_path / "loaded"), *common[3:]]) == 0
    assert "realised 3.594 bits/weight" in capsys.readouterr().out
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert len(list((tmp_path / "streamed").glob("model-*.safetensors"))) > 1
    assert torch.equal(logits(streamed), logits(AutoModelForCausalLM.from_pretrained(tmp_path / "loaded")))
    assert AutoTokenizer.from_pretrained(tmp_path / "streamed")("the model")["input_ids"]


def test_low_memory_mixed_bits_writes_the_same_checkpoint_and_allocation(llama_dir, tmp_path):
    common = ["-q", "quantize", str(llama_dir), "--iters", "0", "--avg-bits", "3", "--bit-options", "2:32,4:32",
              "--sensitivity-method", "weight_error"]
    assert main([*common[:3], str(tmp_path / "streamed"), *common[3:], "--low-memory"]) == 0
    assert main([*common[:3], str(tmp_path / "loaded"), *common[3:]]) == 0
    from safetensors.torch import load_file

    streamed, loaded = (load_file(tmp_path / kind / "model.safetensors") for kind in ("streamed", "loaded"))
    assert streamed.keys() == loaded.keys() and all(torch.equal(streamed[k], loaded[k]) for k in loaded)
    assert (tmp_path / "streamed" / "allocation.json").read_bytes() == (tmp_path / "loaded" / "allocation.json").read_bytes()
    configs = [json.loads((tmp_path / kind / "config.json").read_text())["quantization_config"]
               for kind in ("streamed", "loaded")]
    assert configs[0] == configs[1] and configs[0]["realized_avg_bits"] <= 3
    assert json.loads((tmp_path / "loaded" / "allocation.json").read_text())["realized_avg_bits"] <= 3


@pytest.mark.parametrize("extra,message", [
    (["--device-map", "auto"], "--low-memory reads the checkpoint block by block itself: drop --device-map"),
])
def test_low_memory_errors(llama_dir, tmp_path, capsys, extra, message):
    assert main(["-q", "quantize", str(llama_dir), str(tmp_path / "o"), "--iters", "0", "--low-memory", *extra]) == 2
    assert message in capsys.readouterr().err


def test_eval_reads_a_gptq_export_through_auto_round(llama_dir, corpus_file, tmp_path, capsys):
    pytest.importorskip("auto_round", reason="GPTQ checkpoints are evaluated through auto-round on CPU")
    model = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=SignRoundV2Config(bits=4, group_size=32, sym=True, iters=0))
    model.save_pretrained(tmp_path / "ours")
    export_gptq(model, tmp_path / "gptq")
    for folder in ("ours", "gptq"):
        AutoTokenizer.from_pretrained(llama_dir).save_pretrained(tmp_path / folder)
    args = ["--dataset", str(corpus_file), "--windows", "4", "--seqlen", "32", "--max-new-tokens", "0", "--json"]
    ppl = {}
    for folder in ("ours", "gptq"):
        assert main(["-q", "eval", str(tmp_path / folder), *args]) == 0
        ppl[folder] = json.loads(capsys.readouterr().out)["perplexity"]
    assert math.isclose(ppl["gptq"], ppl["ours"], rel_tol=1e-3), ppl  # auto-round computes in float16


# ----------------------------------------------------------------------------- outputs
def listing(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_quantize_into_its_own_folder_keeps_the_float_weights(llama_dir, tmp_path, capsys):
    model = shutil.copytree(llama_dir, tmp_path / "model")
    before = listing(model)
    assert main(["-q", "quantize", str(model), str(model), "--iters", "0", "--overwrite"]) == EXIT_USAGE
    assert f"OUT {model} is the input {model}" in capsys.readouterr().err
    assert listing(model) == before  # byte for byte


def test_an_out_that_is_a_file_is_refused_before_loading(llama_dir, tmp_path, capsys, monkeypatch):
    import hf_signround.cli as cli

    monkeypatch.setattr(cli, "_load_model", lambda *a, **kw: pytest.fail("the model was loaded"))
    (tmp_path / "out").write_text("mine")
    assert main(["-q", "quantize", str(llama_dir), str(tmp_path / "out"), "--iters", "0"]) == EXIT_USAGE
    assert (f"hf-signround quantize: error: OUT {tmp_path}/out is a file, not a folder: choose a folder path for OUT "
            "(or remove the file)") in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "mine"


def test_a_full_out_needs_overwrite_and_is_then_replaced_whole(llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["-q", "quantize", str(llama_dir), str(out), "--iters", "0", "--group-size", "32"]
    assert main([*args, "--max-shard-size", "30KB"]) == 0
    sharded = listing(out)
    assert "model.safetensors.index.json" in sharded and "model-00001-of-00004.safetensors" in sharded
    assert main(args) == EXIT_USAGE
    assert f"OUT {out} is not empty: pass --overwrite (overwrite=True) to replace its contents" in capsys.readouterr().err
    assert listing(out) == sharded
    assert main([*args, "--overwrite"]) == 0
    assert sorted(listing(out)) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                    "tokenizer_config.json"]  # no stale shard or index
    assert AutoModelForCausalLM.from_pretrained(out)  # and it loads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("low_memory", [False, True])
def test_an_interrupted_quantize_leaves_out_as_it_was(llama_dir, tmp_path, capsys, monkeypatch, low_memory):
    import hf_signround.cli as cli
    import hf_signround.streaming as streaming

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier checkpoint")
    calls = []

    def ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == (4 if low_memory else 1):
            raise KeyboardInterrupt

    if low_memory:  # Ctrl-C while blocks are being written: after 3 tensors outside the blocks and block 0
        monkeypatch.setattr(streaming, "return_freed_memory", ctrl_c)
    else:  # Ctrl-C after the model is saved, while the tokenizer is
        tokenizer = cli._load_tokenizer(str(llama_dir), required=False)
        monkeypatch.setattr(tokenizer, "save_pretrained", ctrl_c)
        monkeypatch.setattr(cli, "_load_tokenizer", lambda *a, **kw: tokenizer)
    args = ["-q", "quantize", str(llama_dir), str(out), "--iters", "0", "--overwrite", "--max-shard-size", "20KB"]
    assert main([*args, *(["--low-memory"] if low_memory else [])]) == 130
    assert len(calls) == (4 if low_memory else 1)
    assert capsys.readouterr().err.endswith("hf-signround quantize: interrupted\n")
    assert listing(out) == {"model.safetensors": b"an earlier checkpoint"}  # no .shard-*.tmp either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder


def test_export_into_its_checkpoint_is_refused(llama_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["-q", "quantize", str(llama_dir), str(ckpt), "--iters", "0", "--group-size", "32"]) == 0
    before = listing(ckpt)
    assert main(["-q", "export", str(ckpt), str(ckpt), "--overwrite"]) == EXIT_USAGE
    assert f"hf-signround export: error: OUT {ckpt} is the input {ckpt}: writing there" in capsys.readouterr().err
    assert listing(ckpt) == before


def test_a_truncated_checkpoint_is_an_unreadable_input(llama_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["-q", "quantize", str(llama_dir), str(ckpt), "--iters", "0", "--group-size", "32"]) == 0
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    assert main(["-q", "export", str(ckpt), str(tmp_path / "gptq")]) == EXIT_INPUT
    assert (f"hf-signround export: error: {weights} is not a valid safetensors file: the file has 1000 bytes, fewer "
            "than its header length field says.") in capsys.readouterr().err
    assert main(["-q", "inspect", str(ckpt)]) == EXIT_INPUT
    assert f"{weights} is not a valid safetensors file" in capsys.readouterr().err
    (ckpt / "config.json").write_text("{not json")
    assert main(["-q", "inspect", str(ckpt)]) == EXIT_INPUT
    assert (f"hf-signround inspect: error: {ckpt}/config.json is not valid JSON (Expecting property name enclosed in "
            "double quotes: line 1 column 2 (char 1)): the file is damaged; re-download or re-save the checkpoint") \
        in capsys.readouterr().err


def test_nonfinite_weights_through_the_command_line(tmp_path, capsys):
    from tests.test_quantize import BAD, message, with_nonfinite
    from tests.tiny import tiny_llama

    with_nonfinite(tiny_llama()).save_pretrained(tmp_path / "fp")
    args = ["-q", "quantize", str(tmp_path / "fp"), str(tmp_path / "out"), "--iters", "0", "--group-size", "32"]
    assert main(args) == EXIT_USAGE
    assert f"hf-signround quantize: error: {message()}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--skip-nonfinite"]) == 0
    assert "quantized 13 layers (13 W4G32 asym)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert BAD not in saved["layer_config"] and saved["skip_nonfinite"] is True


def test_everything_the_cli_writes_follows_the_umask(llama_dir, tmp_path):
    """Readable by other users under umask 022, like any file: safetensors alone would write 0600."""
    old = os.umask(0o022)
    try:
        common = ["-q", "quantize", str(llama_dir), "--iters", "0", "--group-size", "32"]
        assert main([*common[:3], str(tmp_path / "loaded"), *common[3:]]) == 0
        assert main([*common[:3], str(tmp_path / "streamed"), *common[3:], "--low-memory"]) == 0
        assert main([*common[:3], str(tmp_path / "gptq"), *common[3:], "--format", "gptq"]) == 0
        assert main(["-q", "export", str(tmp_path / "loaded"), str(tmp_path / "exported")]) == 0
    finally:
        os.umask(old)
    for out in ("loaded", "streamed", "gptq", "exported"):
        paths = [tmp_path / out, *(tmp_path / out).rglob("*")]
        assert {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in paths} == {
            p.relative_to(tmp_path).as_posix(): "0o755" if p.is_dir() else "0o644" for p in paths}


def test_gptq_regrouping_is_said_by_export_quantize_and_inspect(llama_dir, tmp_path, capsys):
    """At G128 the 64-wide inputs cannot hold a whole group: GPTQ gets G64 there, and every command says so."""
    from hf_signround.shards import format_size

    line = ("12 layers written with group size 64 (G128 does not divide in_features 64; GPTQ kernels need equal "
            "groups)")
    common = ["-q", "quantize", str(llama_dir), "--iters", "0", "--group-size", "128", "--sym"]
    assert main([*common[:3], str(tmp_path / "ours"), *common[3:]]) == 0
    assert "written with group size" not in capsys.readouterr().out
    assert main(["-q", "export", str(tmp_path / "ours"), str(tmp_path / "exported")]) == 0
    size = format_size((tmp_path / "exported" / "model.safetensors").stat().st_size)
    assert capsys.readouterr().out == (f"wrote GPTQ checkpoint {tmp_path}/exported ({size}); {line}; 0 zero-point-0 "
                                       "groups mirrored\n")
    assert main([*common[:3], str(tmp_path / "gptq"), *common[3:], "--format", "gptq"]) == 0
    assert capsys.readouterr().out.endswith(f"wrote gptq checkpoint {tmp_path}/gptq ({size}); {line}\n")

    assert main(["inspect", str(tmp_path / "exported")]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].endswith("14 quantized layers (12 W4G64 sym, 2 W4G128 sym), 73,728 weights") and shown[2] == line
    summary = inspect_checkpoint(tmp_path / "exported")
    assert sorted(summary["regrouped"]) == sorted(n for n in summary["per_layer"] if "down_proj" not in n)
    assert set(map(tuple, summary["regrouped"].values())) == {(128, 64)}
    assert inspect_checkpoint(tmp_path / "ours")["regrouped"] == {}  # ours stores the short last group as it is


def test_inspect_lists_layers_in_numeric_order(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=11,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "fp")
    assert main(["-q", "quantize", str(tmp_path / "fp"), str(tmp_path / "q"), "--iters", "0", "--group-size", "32"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "q"), "--layers"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:78]]
    blocks = [int(name.split(".")[2]) for name in rows]
    assert blocks == sorted(blocks) and blocks[:7] == [0] * 7 and blocks[-7:] == [10] * 7
    assert list(inspect_checkpoint(tmp_path / "q")["per_layer"]) == rows
