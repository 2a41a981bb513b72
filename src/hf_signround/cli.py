"""``hf-signround``: quantize, evaluate, inspect and export checkpoints from the command line.

Commands (``hf-signround COMMAND --help`` lists every option with its default)::

    hf-signround quantize MODEL OUT   quantize MODEL (folder, .gguf file or hub id) into OUT
    hf-signround eval MODEL           perplexity on held-out text and generation tokens/s
    hf-signround inspect OUT          per-layer bits, sizes and the realised average bits
    hf-signround export CKPT OUT      rewrite a saved hf_signround checkpoint as GPTQ

``--debug`` (tracebacks, debug logs) and ``-q`` (warnings and errors only) go before or after
COMMAND. Building the parser imports neither torch nor transformers, so ``--help`` is instant.

Exit codes: 0 done; 1 unexpected failure (``--debug`` shows the traceback); 2 an invalid
option or setting (the message names it and what is allowed), including an OUT that is the
input, lies inside it, is a file, or is not empty without ``--overwrite``; 3 an input that
cannot be found or read (a model, a dataset, a checkpoint folder, a damaged file); 130
interrupted.

OUT is written into a temporary folder beside it and moved into place only when complete:
a failed or interrupted run leaves OUT as it was, and ``--overwrite`` replaces it whole.

The quantization defaults are ``SignRoundV2Config``'s; the CLI adds none of its own.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.util
import inspect
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from .outputs import check_output, staged_output

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INPUT = 0, 1, 2, 3
OVERWRITE_HELP = ("replace OUT when it is not empty (its whole contents, once the new checkpoint is complete); "
                  "without it a non-empty OUT is refused")
BUILTIN_TEXTS = {
    "pydocs": "Python's library reference (Debian python3.11-doc); the default calibration text",
    "pydocs-heldout": "Python's tutorial, HOWTOs and FAQ, disjoint from 'pydocs'; the default evaluation text",
}


class CLIError(Exception):
    """A failure with a message that says what to fix, and the exit code it maps to."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _config_defaults() -> dict[str, Any]:
    """``SignRoundV2Config.__init__``'s keyword defaults."""
    return _config_source()[0]


@functools.cache
def _config_source() -> tuple[dict[str, Any], dict[str, Any]]:
    """``SignRoundV2Config.__init__``'s defaults and config.py's module-level constants.

    Read from config.py's source, so that building the parser (``--help``) imports neither
    transformers nor torch, which config.py imports (seconds of start-up). Should the source
    stop spelling a default as a literal or a constant, the module is imported instead.
    """
    try:
        return _read_config_source(Path(__file__).with_name("config.py"))
    except (OSError, SyntaxError, ValueError, KeyError, StopIteration) as err:
        logger.debug("cannot read the config defaults from config.py's source (%s): importing it", err)
    from . import config

    params = inspect.signature(config.SignRoundV2Config.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}, vars(config)


def _read_config_source(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):  # not a literal: not a constant the parser needs
                constants[node.targets[0].id] = ast.literal_eval(node.value)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SignRoundV2Config")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__").args
    positional = [*init.posonlyargs, *init.args]
    pairs = [*zip(positional[len(positional) - len(init.defaults):], init.defaults),
             *((a, d) for a, d in zip(init.kwonlyargs, init.kw_defaults) if d is not None)]
    defaults = {arg.arg: constants[node.id] if isinstance(node, ast.Name) else ast.literal_eval(node)
                for arg, node in pairs}
    return defaults, constants


def parse_bit_options(text: str) -> list[tuple[int, int]]:
    """``"2:64,4:128"`` -> ``[(2, 64), (4, 128)]`` (group -1: one group per output channel)."""
    pairs = []
    for item in text.split(","):
        bits, sep, group = item.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(bits), int(group)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} is not BITS:GROUP_SIZE; write the candidates as e.g. 2:64,4:128"
            ) from None
    return pairs


# ----------------------------------------------------------------------------- inputs
def _texts(name: str) -> list[str] | str:
    """A built-in corpus by name, else the string as a dataset spec (path or hub name)."""
    from .assets import calibration_texts, heldout_texts

    from .calibration import looks_like_path

    loaders = {"pydocs": calibration_texts, "pydocs-heldout": heldout_texts}
    if name in loaders:
        try:
            return loaders[name]()
        except FileNotFoundError as err:
            raise CLIError(f"{err}; or pass --dataset with a text file, a folder or a hub dataset name",
                           EXIT_INPUT) from err
    if looks_like_path(name) and not Path(name).expanduser().exists():
        raise CLIError(f"dataset {name} not found: give a text file or folder, a hub dataset name, or one of "
                       f"{', '.join(loaders)}", EXIT_INPUT)
    return name


@contextlib.contextmanager
def model_source(model: str, local: bool = False):
    """A folder or hub id ``from_pretrained`` can read; a .gguf file is converted to a temporary folder.

    ``local``: a hub id is downloaded (or found in the cache) and its folder given instead.
    """
    path = Path(model).expanduser()
    if model.startswith(("/", "./", "../", "~")) and not path.exists():
        raise CLIError(f"{model} not found: give a model folder, a .gguf file or a hub model id", EXIT_INPUT)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CLIError(f"GGUF file {path} not found", EXIT_INPUT)
        from .assets import convert_gguf

        with tempfile.TemporaryDirectory(prefix="hf-signround-gguf-") as tmp:
            logger.info("converting %s to a float checkpoint in %s", path, tmp)
            convert_gguf(path, Path(tmp))
            yield tmp
        return
    if path.exists() and not (path / "config.json").is_file():
        raise CLIError(f"{path} has no config.json: give a model folder saved by transformers, a .gguf file "
                       "or a hub model id", EXIT_INPUT)
    if path.exists():
        yield str(path)
    elif local:
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        except Exception as err:  # hub errors have many types; all mean "cannot fetch"
            raise CLIError(f"cannot load model {model!r}: {err}", EXIT_INPUT) from err
        yield folder
    else:
        yield model


def _load_tokenizer(source: str, required: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        if required:
            raise CLIError(f"cannot load a tokenizer from {source} ({err}); calibration text needs one",
                           EXIT_INPUT) from err
        logger.warning("no tokenizer in %s: OUT will hold the weights only", source)
        return None


def _load_model(source: str, **kwargs):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise CLIError(f"cannot load model {source!r}: {err}", EXIT_INPUT) from err


def _folder_size(path: Path) -> str:
    from .shards import format_size

    return format_size(sum(f.stat().st_size for f in path.glob("*.safetensors")))


# ----------------------------------------------------------------------------- commands
def cmd_quantize(args: argparse.Namespace) -> int:
    from .config import SignRoundV2Config
    from .inspection import inspect_checkpoint

    out = Path(args.out)
    knobs = config_knobs(args)
    config = SignRoundV2Config(**knobs)  # bad options fail here, before anything loads
    if config.needs_calibration and args.dataset is None:
        raise CLIError(f"--iters {args.iters} tunes on calibration text (and --avg-bits scores on it): pass "
                       "--dataset (a text file or folder, a hub dataset name, or 'pydocs'), or --iters 0 "
                       "for round-to-nearest")
    if args.low_memory and (args.device_map or args.offload_folder):
        raise CLIError("--low-memory reads the checkpoint block by block itself: drop --device-map/--offload-folder")
    texts = _texts(args.dataset) if config.needs_calibration else None
    check_output(out, sources=_local(args.model), overwrite=args.overwrite)
    with model_source(args.model, local=args.low_memory) as source:
        tokenizer = _load_tokenizer(source, required=config.needs_calibration)
        if config.needs_calibration:
            config = SignRoundV2Config(**knobs, dataset=texts, tokenizer=tokenizer)
        with staged_output(out) as stage:  # everything lands in OUT at once, or not at all
            result = _quantize_into(stage, source, config, args)
            if tokenizer is not None:
                tokenizer.save_pretrained(stage)
            if result.allocation is not None:
                result.allocation.to_json(stage / "allocation.json")
    summary = inspect_checkpoint(out)
    print(f"quantized {summary['layers']} layers ({_schemes_line(summary)}), realised "
          f"{summary['avg_bits']:.3f} bits/weight; wrote {args.format} checkpoint {out} "
          f"({_folder_size(out)})" + "".join(f"; {line}" for line in _regrouping(summary)))
    return EXIT_OK


def config_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``SignRoundV2Config`` arguments of a parsed ``quantize`` command line (no data yet)."""
    return {"bits": args.bits, "group_size": args.group_size, "sym": args.sym, "iters": args.iters,
            "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed, "device": args.device,
            "avg_bits": args.avg_bits, "bit_options": args.bit_options,
            "sensitivity_method": args.sensitivity_method, "modules_to_not_convert": args.keep or None,
            "skip_nonfinite": args.skip_nonfinite}


def _local(model: str) -> tuple[Path, ...]:
    """MODEL as a local input OUT must keep clear of (none for a hub id)."""
    path = Path(model).expanduser()
    return (path,) if path.exists() else ()


def _quantize_into(folder: Path, source: str, config, args: argparse.Namespace):
    """Quantize ``source`` into the (empty) ``folder``; returns the ``QuantizationResult``."""
    from .export import export_gptq

    shards = {"max_shard_size": args.max_shard_size} if args.max_shard_size else {}
    if args.low_memory:
        return _quantize_streaming(source, folder, config, args, shards)
    load = {"quantization_config": config, "dtype": args.dtype}
    if args.device_map:
        load["device_map"] = args.device_map
    if args.offload_folder:
        load["offload_folder"] = args.offload_folder
    model = _load_model(source, **load)
    if args.format == "gptq":
        export_gptq(model, folder, **shards)
    else:
        model.save_pretrained(folder, **shards)
    return model.hf_quantizer.result


def _quantize_streaming(source: str, out: Path, config, args: argparse.Namespace, shards: dict):
    """--low-memory: one block in memory at a time (``streaming.quantize_checkpoint``)."""
    from .export import export_gptq
    from .streaming import quantize_checkpoint

    if args.format != "gptq":
        return quantize_checkpoint(source, out, config, dtype=args.dtype, **shards)
    with tempfile.TemporaryDirectory(prefix="hf-signround-packed-") as tmp:
        result = quantize_checkpoint(source, tmp, config, dtype=args.dtype, **shards)
        export_gptq(_load_model(tmp), out, **shards)  # the packed model only: a fraction of the float one
    return result


def cmd_eval(args: argparse.Namespace) -> int:
    from .inspection import quant_method

    from transformers import AutoTokenizer

    from .evaluation import heldout_windows, perplexity, tokens_per_second

    with model_source(args.model) as source:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise CLIError(f"cannot load a tokenizer from {source} ({err}): evaluation needs one", EXIT_INPUT) from err
        load: dict[str, Any] = {"device_map": args.device} if args.device else {}
        if quant_method(source) == "gptq":
            load["quantization_config"] = _gptq_loader(Path(source))
        model = _load_model(source, **load)
    from .calibration import load_texts

    texts = _texts(args.dataset)
    windows = heldout_windows(tokenizer, texts if isinstance(texts, list) else load_texts(texts),
                              n_windows=args.windows, seqlen=args.seqlen)
    result = {"model": args.model, "dataset": args.dataset, "windows": args.windows, "seqlen": args.seqlen,
              "perplexity": perplexity(model, windows, batch_size=args.batch_size)}
    _result_line(args, f"perplexity {result['perplexity']:.3f} on {args.windows} x {args.seqlen} tokens of "
                       f"{args.dataset}")
    if args.max_new_tokens > 0:
        result["tokens_per_second"] = tokens_per_second(model, tokenizer, args.prompt, args.max_new_tokens)
        _result_line(args, f"generation {result['tokens_per_second']:.1f} tokens/s ({args.max_new_tokens} new "
                           f"tokens, greedy, after {args.prompt!r})")
    if args.json:
        print(json.dumps(result, indent=2))
    return EXIT_OK


def _result_line(args: argparse.Namespace, line: str) -> None:
    """One result, printed the moment it is known: on stdout, or with --json (where stdout holds the
    JSON document alone, printed at the end) on stderr unless -q."""
    if not args.json:
        print(line, flush=True)
    elif not args.quiet:
        print(line, file=sys.stderr, flush=True)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_checkpoint

    from .shards import format_size

    summary = inspect_checkpoint(Path(args.out))
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    if args.layers:
        width = max(len(n) for n in summary["per_layer"])
        print(f"{'layer':<{width}}  bits  group  sym  {'shape':>11}  {'bytes':>9}  bits/weight")
        for name, row in summary["per_layer"].items():
            shape = f"{row['out_features']}x{row['in_features']}"
            print(f"{name:<{width}}  {row['bits']:>4}  {row['group_size']:>5}  {'y' if row['sym'] else 'n':>3}  "
                  f"{shape:>11}  {row['bytes']:>9}  {row['avg_bits']:.3f}")
    print(f"{summary['format']} checkpoint {args.out}: {summary['layers']} quantized layers "
          f"({_schemes_line(summary)}), {summary['params']:,} weights")
    stored = summary.get("config_realized_avg_bits")
    print(f"realised average {summary['avg_bits']:.4f} bits/weight (codes + scales + zero points)"
          + (f"; allocation target {summary['target_avg_bits']}, recorded {stored}" if stored is not None else ""))
    for line in _regrouping(summary):
        print(line)
    print(f"quantized layers {format_size(summary['quantized_bytes'])}, whole checkpoint "
          f"{format_size(summary['checkpoint_bytes'])}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .inspection import inspect_checkpoint, read_config

    from .export import export_gptq

    source, out = Path(args.checkpoint), Path(args.out)
    if not source.exists():
        raise CLIError(f"{source} not found: give the folder of a checkpoint saved by `hf-signround quantize` or "
                       "save_pretrained", EXIT_INPUT)
    if (read_config(source).get("quantization_config") or {}).get("quant_method") != "signround_v2":
        raise CLIError(f"{source} is not an hf_signround checkpoint (quantization_config.quant_method is not "
                       "signround_v2): quantize it first with `hf-signround quantize`")
    check_output(out, sources=(source,), overwrite=args.overwrite)
    model = _load_model(str(source))
    tokenizer = _load_tokenizer(str(source), required=False)
    with staged_output(out) as stage:
        result = export_gptq(model, stage, max_shard_size=args.max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
    regrouped = _regrouping(inspect_checkpoint(out)) or ["every layer keeps its group size"]
    print(f"wrote GPTQ checkpoint {out} ({_folder_size(out)}); {'; '.join(regrouped)}; "
          f"{result.mirrored_groups} zero-point-0 groups mirrored")
    return EXIT_OK


def _regrouping(summary: dict) -> list[str]:
    """The line saying which layers a GPTQ export wrote with a smaller group size, if any."""
    from .export.gptq import describe_regrouping

    regrouped = {name: pair for name, pair in summary["regrouped"].items() if name in summary["per_layer"]}
    if not regrouped:
        return []
    return [describe_regrouping(regrouped, {name: summary["per_layer"][name]["in_features"] for name in regrouped})]


# ----------------------------------------------------------------------------- helpers
def _gptq_loader(folder: Path):
    """auto-round's loader for a GPTQ checkpoint on CPU: its torch kernel (symmetric), or auto-round-lib's."""
    from .inspection import read_config

    try:
        import auto_round  # noqa: F401 - the loader behind AutoRoundConfig
        from transformers import AutoRoundConfig
    except ImportError as err:
        raise CLIError("MODEL is a GPTQ checkpoint: evaluating it on CPU needs auto-round "
                       "(pip install auto-round)", EXIT_INPUT) from err
    qc = read_config(folder)["quantization_config"]
    asym = not qc.get("sym", True) or any(not r.get("sym", True) for r in (qc.get("dynamic") or {}).values())
    if asym and importlib.util.find_spec("auto_round_kernel") is None:
        raise CLIError("MODEL is an asymmetric GPTQ checkpoint: auto-round runs those on CPU only with "
                       "auto-round-lib (pip install auto-round-lib; x86-64 Linux)", EXIT_INPUT)
    return AutoRoundConfig(backend="auto" if asym else "auto_round:torch_zp")


def _schemes_line(summary: dict) -> str:
    return ", ".join(f"{count} {label}" for label, count in summary["schemes"].items())


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The command line; building it imports neither torch nor transformers (``--help`` answers at once)."""
    d, constants = _config_source()
    SENSITIVITY_METHODS = constants["SENSITIVITY_METHODS"]  # noqa: N806
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="hf-signround", description="Quantize (SignRoundV2), evaluate, inspect and export checkpoints.",
        epilog="exit codes: 0 done, 1 unexpected failure, 2 invalid option or setting, 3 input not found or unreadable",
    )
    _add_logging_options(parser, default=False)
    common = argparse.ArgumentParser(add_help=False)  # the same options after the command
    _add_logging_options(common, default=argparse.SUPPRESS)  # absent there: the value given before it stands
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", parents=[common], formatter_class=fmt, help="quantize a model and save it",
                       description="Quantize MODEL with SignRoundV2 and save the result (plus its tokenizer) to OUT.")
    q.add_argument("model", metavar="MODEL", help="a transformers model folder, a .gguf file, or a hub model id")
    q.add_argument("out", metavar="OUT", help="folder to write the quantized checkpoint to")
    q.add_argument("--bits", type=int, default=d["bits"], help="weight bits: 2, 3, 4 or 8")
    q.add_argument("--group-size", type=int, default=d["group_size"],
                   help="input elements sharing a scale; -1 = one group per output channel")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=d["sym"],
                     help="symmetric quantization (implicit zero point)")
    sym.add_argument("--asym", dest="sym", action="store_false", default=argparse.SUPPRESS,
                     help="asymmetric quantization with stored zero points" + ("" if d["sym"] else " (the default)"))
    q.add_argument("--iters", type=int, default=d["iters"],
                   help="sign-gradient tuning steps per block; 0 = round-to-nearest (no data needed)")
    q.add_argument("--nsamples", type=int, default=d["nsamples"], help="calibration windows")
    q.add_argument("--seqlen", type=int, default=d["seqlen"], help="tokens per calibration window")
    q.add_argument("--dataset", default=None,
                   help="calibration text: a text file or folder, a hub dataset ('name' or 'name:config'), or "
                        "'pydocs' (Python's library docs); needed when --iters > 0 or with --avg-bits")
    q.add_argument("--avg-bits", type=float, default=d["avg_bits"],
                   help="target average bits per weight incl. scales and zero points; mixes --bit-options by "
                        "sensitivity (None: every layer gets --bits/--group-size)")
    q.add_argument("--bit-options", type=parse_bit_options, default=d["bit_options"], metavar="B:G,...",
                   help="candidate BITS:GROUP_SIZE pairs for --avg-bits, e.g. 2:64,4:128 (None: "
                        "2:64,3:128,4:128,8:128)")
    q.add_argument("--sensitivity-method", choices=SENSITIVITY_METHODS, default=d["sensitivity_method"],
                   help="how --avg-bits scores layers: second-order DeltaLoss on calibration text (default), the "
                        "spec's DeltaLoss, DeltaLoss with one gradient at the dearest option, or weight error "
                        "(no data)")
    q.add_argument("--keep", action="append", metavar="MODULE",
                   help="keep this module (name or dotted suffix such as mlp.down_proj) in full precision; repeatable")
    q.add_argument("--device", default=d["device"],
                   help="device the block being quantized runs on, e.g. cuda, cuda:1, cpu (None: CUDA if present)")
    q.add_argument("--device-map", default=None,
                   help="accelerate placement while loading, e.g. auto (spread over GPUs, CPU and disk), cpu")
    q.add_argument("--offload-folder", default=None, help="folder for weights --device-map offloads to disk")
    q.add_argument("--low-memory", action="store_true",
                   help="read and quantize one block at a time and write packed blocks as they finish: peak memory "
                        "is about one block plus calibration activations instead of the whole model (see "
                        "docs/BIG_MODELS.md)")
    q.add_argument("--max-shard-size", default=None,
                   help="largest output safetensors file, e.g. 500MB or 5GB (None: transformers' default; 500MB "
                        "with --low-memory)")
    q.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype the model loads in (auto: the checkpoint's)")
    q.add_argument("--seed", type=int, default=d["seed"], help="seeds window choice and tuning")
    q.add_argument("--format", choices=("signround", "gptq"), default="signround",
                   help="signround: reloads with from_pretrained; gptq: GPTQ v1 for vLLM and other GPTQ loaders")
    q.add_argument("--skip-nonfinite", action="store_true", default=d["skip_nonfinite"],
                   help="keep layers whose weights hold NaN or inf in full precision (logged) instead of stopping")
    q.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", parents=[common], formatter_class=fmt, help="perplexity and generation speed",
                       description="Perplexity of MODEL on held-out text, then greedy generation tokens/s; each "
                                   "is printed as soon as it is known.")
    e.add_argument("model", metavar="MODEL", help="a model folder (float, hf_signround or GPTQ), .gguf file or hub id")
    e.add_argument("--dataset", default="pydocs-heldout",
                   help="text: a file or folder, a hub dataset, or a built-in: " + "; ".join(
                       f"'{k}' = {v}" for k, v in BUILTIN_TEXTS.items()))
    e.add_argument("--windows", type=int, default=40, help="evenly spaced windows of the text")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    e.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    e.add_argument("--prompt", default="def fibonacci(n):", help="prompt of the speed measurement")
    e.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated for tokens/s; 0 skips it")
    e.add_argument("--device", default=None, help="device to run on, e.g. cuda or cpu (None: where it loads)")
    e.add_argument("--json", action="store_true",
                   help="print the results as one JSON document on stdout at the end (each result also goes to "
                        "stderr as soon as it is known, unless -q)")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", parents=[common], formatter_class=fmt, help="per-layer bits and sizes of a checkpoint",
                       description="Bits, group size, bytes per quantized layer and the realised average of OUT "
                                   "(reads config.json and tensor headers only).")
    i.add_argument("out", metavar="OUT", help="an hf_signround or GPTQ checkpoint folder")
    i.add_argument("--layers", action="store_true", help="print one line per layer")
    i.add_argument("--json", action="store_true", help="print everything as JSON")
    i.set_defaults(func=cmd_inspect)

    x = sub.add_parser("export", parents=[common], formatter_class=fmt, help="rewrite an hf_signround checkpoint as GPTQ",
                       description="Convert a saved hf_signround checkpoint to the GPTQ v1 layout, exactly.")
    x.add_argument("checkpoint", metavar="CKPT", help="folder written by `hf-signround quantize` or save_pretrained")
    x.add_argument("out", metavar="OUT", help="folder to write the GPTQ checkpoint to")
    x.add_argument("--format", choices=("gptq",), default="gptq", help="target layout")
    x.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 500MB or 5GB")
    x.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    x.set_defaults(func=cmd_export)
    return parser


def _add_logging_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="only warnings and errors on stderr")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    where = f"hf-signround {args.command}"
    try:
        return args.func(args)
    except CLIError as err:
        print(f"{where}: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        code = _exit_code(err)
        if code == EXIT_FAILED:
            print(f"{where}: failed: {type(err).__name__}: {err} (run with --debug for the traceback)", file=sys.stderr)
        else:
            print(f"{where}: error: {err}", file=sys.stderr)
        return code


def _exit_code(err: Exception) -> int:
    """The exit code of an error the library raised; its message names what to fix."""
    from .shards import CheckpointError

    if isinstance(err, (CheckpointError, OSError)):  # a damaged or mismatched file; a file not found or unreadable
        return EXIT_INPUT
    if isinstance(err, (ValueError, TypeError)):  # config and plan validation: the message names the setting
        return EXIT_USAGE
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
