"""`SignRoundV2Config`: every user-facing knob, its default, and all validation.

The config is plain data. It is validated once, at construction, and downstream
code trusts it. Runtime-only objects (the calibration ``dataset`` and the
``tokenizer``) live on the object but are never serialised.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .calibration import check_dataset_spec
from .packing import check_bits

logger = logging.getLogger(__name__)

QUANT_METHOD = "signround_v2"
FORMAT_VERSION = 1
SCALE_DTYPES = ("float16", "bfloat16", "float32")
TOPK_MODES = ("drop", "huber")
SENSITIVITY_METHODS = ("deltaloss", "deltaloss_anchored", "deltaloss_fisher", "weight_error")
DEFAULT_BIT_OPTIONS = ((2, 64), (3, 128), (4, 128), (8, 128))
_LAYER_KEYS = ("bits", "group_size", "sym")
# Keys written by `to_dict` that are bookkeeping rather than constructor knobs.
_RUNTIME_ONLY = ("dataset", "tokenizer")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name}={value} is out of range: it must be >= {minimum}")


def check_group_size(value: Any, where: str = "group_size") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value >= 1):
        raise ValueError(
            f"{where}={value!r} is not valid: use a positive int (e.g. 32, 64, 128), "
            "or -1 for one group per output channel"
        )


def _as_pairs(options: Any) -> list[tuple[int, int]] | None:
    """``bit_options`` as a list of int pairs (config.json stores them as lists)."""
    if options is None:
        return None
    try:
        pairs = [tuple(o) for o in options]
    except TypeError as err:
        raise TypeError(f"bit_options must be a list of (bits, group_size) pairs, got {options!r}") from err
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"bit_options must be a list of (bits, group_size) pairs, got {options!r}")
    return pairs


def _as_layer_config(layer_config: Any) -> dict[str, dict[str, Any]]:
    """``layer_config`` as a fresh dict of dicts (config.json may hold anything)."""
    if layer_config is None:
        return {}
    if not isinstance(layer_config, dict) or not all(isinstance(v, dict) for v in layer_config.values()):
        raise TypeError(f"layer_config must be a dict of module name -> {{'bits': ..., 'group_size': ..., 'sym': ...}}, "
                        f"got {repr(layer_config)[:100]}")
    return {k: dict(v) for k, v in layer_config.items()}


class SignRoundV2Config(QuantizationConfigMixin):
    """Configuration of SignRoundV2 weight-only quantization (spec: ``shared/SIGNROUNDV2.md``).

    Plain input: quantizing reads it and never changes it (``quantize_model`` returns a
    ``QuantizationResult``; the transformers adapter records in its copy the keys a saved
    checkpoint needs: ``layer_config`` and ``realized_avg_bits``). All arguments are keywords.

    The scheme:
        bits: weight bit-width of every quantized layer, one of 2, 3, 4, 8.
        group_size: consecutive input elements sharing one scale/zero point; -1 means one
            group per output channel. When it does not divide a layer's ``in_features`` the
            last group of each row is shorter (column k is in group k // group_size).
        sym: symmetric ("full range", implicit zero point) instead of asymmetric quantization.
        layer_config: per-layer overrides, ``{"model.layers.0.mlp.down_proj": {"bits": 8,
            "group_size": 128, "sym": True}}``; missing keys fall back to the global values.
            A saved checkpoint's lists every quantized layer, so it is self-describing.
        modules_to_not_convert: module names (or dotted suffixes such as ``"mlp.down_proj"``)
            kept in full precision, in addition to the default lm_head and embeddings.
        skip_nonfinite: a layer whose weight holds NaN or inf cannot be quantized, so by default
            quantization stops before anything changes, naming those layers and their counts;
            True keeps such layers in full precision instead (logged as a warning) and quantizes
            the rest.

    Mixed precision (spec §1-2):
        avg_bits: target average bits per quantized weight, counting the per-group scales and
            zero points. When set, every layer not pinned by ``layer_config`` gets one of
            ``bit_options`` by dynamic programming on its sensitivity; the realised average is
            never above the target. None keeps one ``bits``/``group_size`` for all layers.
        bit_options: candidate ``(bits, group_size)`` pairs for ``avg_bits``; ``sym`` comes from
            the config. None means ``[(2, 64), (3, 128), (4, 128), (8, 128)]``.
        sensitivity_method: how layers are scored for ``avg_bits``: ``"deltaloss_fisher"``
            (default; the lowest tuned perplexity of the allocators at 2.5 and 3.0 bits with
            W2G64/W4G128 on SmolLM2-135M: one forward+backward of the float model in all,
            signed first-order term plus an empirical-Fisher second-order term, ``W − Q(W)``
            from the scale search tuning starts from; ``sensitivity.taylor_scores``),
            ``"deltaloss"`` (spec §1: one forward+backward per option, the gradient taken with
            every layer at that option), ``"deltaloss_anchored"`` (one forward+backward in all,
            the gradient taken with every layer at the dearest option), or ``"weight_error"``
            (``‖W - Q(W)‖²``, no data; a baseline).
        sensitivity_nsamples: calibration windows the DeltaLoss scoring runs on.
        sensitivity_seqlen: tokens per scoring window.
        tie_fused: give layers that read the same input (q/k/v of one attention, gate/up of one
            MLP, which serving engines fuse into one matrix) one option, priced and scored together.

    Tuning (spec §3):
        iters: sign-gradient tuning steps per block (default 100: on SmolLM2-135M it reached
            auto-round V2's 200-step default perplexity at W4G128 and W2G64 in under half its
            time; 200, the paper's setting, is the documented "best": perplexity still fell
            from 50 to 100 steps); 0 means plain round-to-nearest (a
            ``dataset`` then serves the ``avg_bits`` scoring only). ``quantize_model`` given
            calibration windows at ``iters=0`` runs the scale search alone on them (spec §3b).
        lr: tuning learning rate; ``None`` means the spec's default: ``1/iters``, or
            ``2/iters`` for ``iters >= 1000`` when ``bits <= 3`` (with ``avg_bits``: when
            any bit option is 3 bits or fewer).
        batch_size: calibration windows per tuning step.
        seed: seeds the calibration window choice and the tuning.
        scale_search: run the activation-weighted pre-tuning scale search (spec §3b) to
            initialise each group's range; False starts tuning from min-max (ablation).
        topk_exclusion: leave the largest ``topk_ratio`` of element-wise errors out of the
            tuning loss (spec §3c'); None turns it on for blocks with a layer below 4 bits.
        topk_ratio: fraction of errors excluded (default 0.1 %).
        topk_mode: how the excluded errors count: ``"huber"`` (default) counts them linearly past
            the largest kept error, so their pull on the gradient is capped but not zero and
            tuning cannot move error onto them; ``"drop"`` leaves them out of the loss (spec
            §3c'). On SmolLM2-135M at W2G64 sym, "drop" gave 9 % higher perplexity than
            "huber" (34.94 against 32.12; docs/BENCHMARKS.md).
        amp: run the tuning steps under bfloat16 autocast where the device does bfloat16
            matrix products fast: CUDA with bf16, and CPUs with AVX512-BF16 or AMX on which a
            bfloat16 product measures at least 1.25x faster than float32 (timed once per
            process and logged); the float reference outputs, the losses and the quantized
            chain stay in the model's dtype. False always tunes in the model's dtype.

    Calibration data (never saved):
        dataset: calibration text: a list of strings, a path to a text file or a folder of
            text files, a ``datasets.Dataset`` with a text column, a hub dataset name
            (``"name"`` or ``"name:config"``), or a LongTensor of token ids.
        tokenizer: tokenizes ``dataset`` when it is text.
        nsamples: calibration windows of ``seqlen`` tokens drawn from ``dataset``.
        seqlen: tokens per calibration window.

    Where it runs, and storage:
        device: where blocks are quantized one at a time ("cuda", "cuda:1", "cpu"); None
            means CUDA when available, else CPU. Only the block being quantized (and the
            calibration activations) is on it; offloaded blocks are brought in one by one.
        backend: kernels for the quantized layers' forward: ``"auto"`` (the fastest that can run:
            Triton on CUDA, auto-round-lib's or torch's int4 kernel on CPU, else the pure-torch
            reference), or one of ``"triton"``, ``"ark"``, ``"aten_int4"``, ``"torch"`` (raise where
            it cannot run); ``HF_SIGNROUND_BACKEND`` overrides it (see kernels/backend.py).
        scale_dtype: storage dtype of the per-group scales.

    Checkpoint metadata, read by :meth:`from_dict` and never passed by users: ``format_version``
    (the packed layout, ``packing.py``) and ``realized_avg_bits`` (the average bits the
    checkpoint's packed layers take).
    """

    def __init__(
        self,
        *,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = False,
        layer_config: dict[str, dict[str, Any]] | None = None,
        modules_to_not_convert: list[str] | None = None,
        skip_nonfinite: bool = False,
        avg_bits: float | None = None,
        bit_options: list[tuple[int, int]] | None = None,
        sensitivity_method: str = "deltaloss_fisher",
        sensitivity_nsamples: int = 16,
        sensitivity_seqlen: int = 256,
        tie_fused: bool = True,
        iters: int = 100,
        lr: float | None = None,
        batch_size: int = 8,
        seed: int = 42,
        scale_search: bool = True,
        topk_exclusion: bool | None = None,
        topk_ratio: float = 0.001,
        topk_mode: str = "huber",
        amp: bool = True,
        dataset: Any = None,
        tokenizer: Any = None,
        nsamples: int = 128,
        seqlen: int = 2048,
        device: str | None = None,
        backend: str = "auto",
        scale_dtype: str = "float16",
        **kwargs: Any,
    ) -> None:
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method={quant_method!r} does not belong to SignRoundV2Config ({QUANT_METHOD!r})")
        self.quant_method = QUANT_METHOD
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.layer_config = _as_layer_config(layer_config)
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert else None
        self.skip_nonfinite = skip_nonfinite
        self.avg_bits, self.bit_options = avg_bits, _as_pairs(bit_options)
        self.sensitivity_method = sensitivity_method
        self.sensitivity_nsamples, self.sensitivity_seqlen = sensitivity_nsamples, sensitivity_seqlen
        self.tie_fused = tie_fused
        self.iters, self.lr, self.batch_size, self.seed = iters, lr, batch_size, seed
        self.scale_search = scale_search
        self.topk_exclusion, self.topk_ratio, self.topk_mode = topk_exclusion, topk_ratio, topk_mode
        self.amp = amp
        self.dataset, self.tokenizer, self.nsamples, self.seqlen = dataset, tokenizer, nsamples, seqlen
        self.device, self.backend, self.scale_dtype = device, backend, scale_dtype
        self.format_version = FORMAT_VERSION  # checkpoint metadata (see from_dict)
        self.realized_avg_bits: float | None = None
        if kwargs:
            logger.warning("SignRoundV2Config ignores unknown keys: %s", ", ".join(sorted(kwargs)))
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; errors name the field, the value and what is allowed."""
        check_bits(self.bits)
        check_group_size(self.group_size)
        if not isinstance(self.sym, bool):
            raise TypeError(f"sym must be True or False, got {self.sym!r}")
        _check_int("iters", self.iters, minimum=0)
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or self.lr <= 0):
            raise ValueError(f"lr={self.lr!r} must be a positive number, or None for the default (1/iters)")
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("nsamples", self.nsamples, minimum=1)
        _check_int("seqlen", self.seqlen, minimum=2)
        _check_int("seed", self.seed, minimum=0)
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"device={self.device!r} is not a torch device (e.g. 'cuda', 'cuda:0', 'cpu')") from err
        if not isinstance(self.amp, bool):
            raise TypeError(f"amp must be True or False, got {self.amp!r}")
        if not isinstance(self.skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {self.skip_nonfinite!r}")
        if not isinstance(self.scale_search, bool):
            raise TypeError(f"scale_search must be True or False, got {self.scale_search!r}")
        if self.topk_exclusion is not None and not isinstance(self.topk_exclusion, bool):
            raise TypeError(f"topk_exclusion must be True, False or None (auto: below 4 bits), got {self.topk_exclusion!r}")
        if isinstance(self.topk_ratio, bool) or not isinstance(self.topk_ratio, (int, float)) or not 0 < self.topk_ratio < 1:
            raise ValueError(f"topk_ratio={self.topk_ratio!r} must lie strictly between 0 and 1 (default 0.001)")
        if self.topk_mode not in TOPK_MODES:
            raise ValueError(f"topk_mode={self.topk_mode!r} is not supported: choose one of {', '.join(TOPK_MODES)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r} is not supported: choose one of {', '.join(SCALE_DTYPES)}")
        from .kernels.backend import check_backend

        check_backend(self.backend)
        if self.modules_to_not_convert is not None and not all(isinstance(m, str) for m in self.modules_to_not_convert):
            raise TypeError(f"modules_to_not_convert must be a list of module names, got {self.modules_to_not_convert!r}")
        for name, spec in self.layer_config.items():
            unknown = set(spec) - set(_LAYER_KEYS)
            if unknown:
                raise ValueError(
                    f"layer_config[{name!r}] has unknown keys {sorted(unknown)}: allowed are {', '.join(_LAYER_KEYS)}"
                )
            if "bits" in spec:
                check_bits(spec["bits"], where=f"layer_config[{name!r}]['bits']")
            if "group_size" in spec:
                check_group_size(spec["group_size"], where=f"layer_config[{name!r}]['group_size']")
            if "sym" in spec and not isinstance(spec["sym"], bool):
                raise TypeError(f"layer_config[{name!r}]['sym'] must be True or False, got {spec['sym']!r}")
        self._check_allocation()
        check_dataset_spec(self.dataset)

    def _check_allocation(self) -> None:
        if self.avg_bits is not None and (
            isinstance(self.avg_bits, bool) or not isinstance(self.avg_bits, (int, float)) or not 1 < self.avg_bits < 32
        ):
            raise ValueError(f"avg_bits={self.avg_bits!r} must be a number of bits per weight such as 2.5 or 3.0, or None")
        if self.bit_options is not None:
            if not self.bit_options:
                raise ValueError("bit_options is empty: give (bits, group_size) pairs such as [(2, 64), (4, 128)], or None")
            for i, (bits, group) in enumerate(self.bit_options):
                check_bits(bits, where=f"bit_options[{i}] bits")
                check_group_size(group, where=f"bit_options[{i}] group_size")
            if len(set(self.bit_options)) != len(self.bit_options):
                raise ValueError(f"bit_options={self.bit_options} lists an option twice")
        if self.sensitivity_method not in SENSITIVITY_METHODS:
            raise ValueError(
                f"sensitivity_method={self.sensitivity_method!r} is not supported: choose one of "
                f"{', '.join(SENSITIVITY_METHODS)}"
            )
        _check_int("sensitivity_nsamples", self.sensitivity_nsamples, minimum=1)
        _check_int("sensitivity_seqlen", self.sensitivity_seqlen, minimum=2)
        if not isinstance(self.tie_fused, bool):
            raise TypeError(f"tie_fused must be True or False, got {self.tie_fused!r}")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """The config saved in a checkpoint's config.json (transformers calls this when loading one),
        with its metadata (``format_version``, ``realized_avg_bits``)."""
        settings = dict(config_dict)
        version = settings.pop("format_version", FORMAT_VERSION)
        realized = settings.pop("realized_avg_bits", None)
        try:
            if version != FORMAT_VERSION:
                raise ValueError(f"format_version={version!r}: this hf_signround reads format {FORMAT_VERSION} only; "
                                 "upgrade hf_signround to load this checkpoint")
            if realized is not None and (isinstance(realized, bool) or not isinstance(realized, (int, float))):
                raise ValueError(f"realized_avg_bits={realized!r} is not a number")
            out = super().from_dict(settings, return_unused_kwargs, **kwargs)
        except (TypeError, ValueError) as err:
            raise type(err)(f"invalid quantization_config in the checkpoint's config.json: {err}. Restore the "
                            "config.json saved with the checkpoint, or re-download it") from err
        (out[0] if return_unused_kwargs else out).realized_avg_bits = realized
        return out

    def record(self, result) -> None:
        """Write what a quantization produced into the keys a saved checkpoint needs: every
        quantized layer's spec (``layer_config``) and the realised average bits."""
        self.layer_config = result.layer_config
        self.realized_avg_bits = result.realized_avg_bits

    def calibration_error(self) -> str:
        """The message for a quantization that needs calibration data and has none."""
        why = (f"iters={self.iters} tunes on calibration data" if self.tunes
               else f"avg_bits={self.avg_bits} scores layers by DeltaLoss on calibration data")
        fix = ("or iters=0 for round-to-nearest" if self.tunes
               else "or sensitivity_method='weight_error' for a data-free allocation")
        return (f"{why}: pass dataset= (a list of texts, a text file or folder, a datasets.Dataset or a hub dataset "
                f"name) and tokenizer= to SignRoundV2Config, {fix}")

    @property
    def tunes(self) -> bool:
        """Whether blocks are tuned (``iters > 0``) rather than rounded to nearest."""
        return self.iters > 0

    @property
    def scores_on_data(self) -> bool:
        """Whether the bit allocation runs DeltaLoss on calibration windows."""
        return self.avg_bits is not None and self.sensitivity_method.startswith("deltaloss")

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing with this config reads calibration data."""
        return self.tunes or self.scores_on_data

    @property
    def options(self) -> list[tuple[int, int]]:
        """The ``(bits, group_size)`` candidates of the bit allocation."""
        return list(self.bit_options) if self.bit_options is not None else list(DEFAULT_BIT_OPTIONS)

    @property
    def compute_device(self):
        import torch

        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def effective_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        low_bits = min([self.bits] if self.avg_bits is None else [b for b, _ in self.options]) <= 3
        return (2.0 if self.iters >= 1000 and low_bits else 1.0) / max(self.iters, 1)

    def layer_spec(self, name: str) -> dict[str, Any]:
        """The (bits, group_size, sym) a layer is quantized with: its override, else the globals."""
        spec = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        spec.update(self.layer_config.get(name, {}))
        return spec

    def to_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in _RUNTIME_ONLY and not k.startswith("_")}
        out["quant_method"] = QUANT_METHOD
        return out

    def __iter__(self):
        yield from self.to_dict().items()

    def __deepcopy__(self, memo: dict) -> SignRoundV2Config:
        # from_pretrained deep-copies its kwargs: share the runtime-only objects (a tokenizer,
        # a generator or a big dataset) instead of copying or pickling them.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key in _RUNTIME_ONLY else copy.deepcopy(value, memo)
        return new
