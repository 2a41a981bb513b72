"""Launcher for the Triton kernels: checks, kernel choice, config choice, workspace.

``quant_linear`` is what the ``hf_signround::quant_linear`` custom op runs. It validates
shapes, dtypes and contiguity (errors name the problem and the fix), picks the kernel by
the number of activation rows (``gemv`` for 1, ``decode`` for 2..16, the fused ``prefill``
up to ``DEQUANT_MIN_ROWS``, above that ``dequant``: the dense weight written by one kernel,
then a cuBLAS product) and a launch config from ``triton_kernels.CONFIGS``: on first use of a problem key each
candidate is timed once and the fastest is kept for the process. Under Triton's CPU
interpreter, or while a CUDA graph is being captured (timing would synchronise), the first
candidate that fits is used instead.

``LayerLauncher`` does the same for one layer's eager calls with the checks of the stored
tensors and each row count's launch set-up (config, grid, constexprs) done once: the
``triton`` backend's eager path (``backend.py``), 28 -> 8.4 µs of Python a call on our CPU
(``benchmarks/call_overhead.py``).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import triton
import triton.testing
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

from hf_signround.kernels.backend import triton_interpret
from hf_signround.kernels.triton_kernels import CONFIGS, dequant_kernel, gemm_kernel, gemv_kernel
from hf_signround.packing import SUPPORTED_BITS, num_groups, packed_rows

logger = logging.getLogger(__name__)

__all__ = ["TUNED", "LayerLauncher", "dequantize", "kernel_for_rows", "quant_linear", "unsupported_reason"]

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
DECODE_MAX_ROWS = 16
# Above this many rows a layer dequantizes to a dense weight and calls cuBLAS. A guess from the
# fused prefill kernel's 0.4-0.6x of cuBLAS at 512-2048 rows on an H200; benchmarks/gpu_check.py
# measures the crossover (not yet run on a GPU).
DEQUANT_MIN_ROWS = 128

# (kind, rows bucket, N, K, bits, group_size, sym, dtype, device) -> chosen config,
# and the per-candidate timings (ms) that chose it, for benchmarks and notes.
TUNED: dict[tuple, dict] = {}
TIMINGS: dict[tuple, list[tuple[dict, float]]] = {}
_LOCKS: dict[torch.device, torch.Tensor] = {}


def unsupported_reason(dtype: torch.dtype, bits: int, group_size: int) -> str | None:
    """Why the Triton kernels cannot run this layer/input, with the fix; ``None`` if they can."""
    if dtype not in ACTIVATION_DTYPES:
        return (
            f"the activations are {dtype}, but the Triton kernels take float16 or bfloat16: load the model with "
            "dtype=torch.float16 or torch.bfloat16, or use backend='torch'"
        )
    if bits not in SUPPORTED_BITS:
        return f"bits={bits} is not one of {list(SUPPORTED_BITS)}"
    if group_size != -1 and (group_size <= 0 or group_size % 32):
        return (
            f"group_size={group_size} is not a multiple of 32 (or -1, per channel), which the Triton kernels "
            "need; use backend='torch' for this layer or quantize with group_size 32, 64, 128, ..."
        )
    return None


def kernel_for_rows(rows: int) -> str:
    if rows == 1:
        return "gemv"
    return "decode" if rows <= DECODE_MAX_ROWS else "prefill" if rows <= DEQUANT_MIN_ROWS else "dequant"


def _check_input(x: torch.Tensor, in_features: int) -> None:
    if x.shape[-1] != in_features:
        raise ValueError(f"the input's last dimension is {x.shape[-1]}, but the layer has in_features={in_features}")


def _check_stored(qweight, scales, qzeros, bias, bits, group_size, in_features, device: torch.device) -> None:
    """The stored tensors against the layer's shape, and on ``device`` (where the input is)."""
    k = in_features
    if qweight.dtype != torch.int32 or qweight.ndim != 2 or qweight.shape[0] != packed_rows(k, bits):
        raise ValueError(
            f"qweight must be int32 ({packed_rows(k, bits)}, N) for in_features={k}, bits={bits}; got "
            f"{qweight.dtype} {tuple(qweight.shape)}"
        )
    n = qweight.shape[1]
    g = num_groups(k, group_size)
    if tuple(scales.shape) != (g, n) or not scales.dtype.is_floating_point:
        raise ValueError(f"scales must be float ({g}, {n}); got {scales.dtype} {tuple(scales.shape)}")
    if qzeros is not None and (qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (g, packed_rows(n, bits))):
        raise ValueError(
            f"qzeros must be int32 ({g}, {packed_rows(n, bits)}); got {qzeros.dtype} {tuple(qzeros.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},); got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("qzeros", qzeros), ("bias", bias)):
        if t is None:
            continue
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the input is on {device}: move the layer and input together")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous() on it (the packed layout is row-major)")


def _check_dtype(dtype: torch.dtype, bits: int, group_size: int) -> None:
    reason = unsupported_reason(dtype, bits, group_size)
    if reason:
        raise ValueError(reason)


def _check(x, qweight, scales, qzeros, bias, bits, group_size, in_features) -> None:
    _check_dtype(x.dtype, bits, group_size)
    _check_input(x, in_features)
    _check_stored(qweight, scales, qzeros, bias, bits, group_size, in_features, x.device)


def _fits(kind: str, cfg: dict, bits: int) -> bool:
    # A gemv tile must hold at least one packed unit (32 k for 3 bits).
    return kind != "gemv" or cfg["BLOCK_K"] >= 32


def _locks(device: torch.device, count: int) -> torch.Tensor:
    """Per-tile split-K counters; every launch leaves them at zero."""
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < count:
        locks = torch.zeros(max(count, 8192), dtype=torch.int32, device=device)
        _LOCKS[device] = locks
    return locks


WAVES = 4
_SMS: dict[torch.device, int] = {}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv and next_power_of_2 cost about 3 us a call (constexpr wrappers)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _auto_split(tiles: int, k_tiles: int, device: torch.device) -> int:
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = _cdiv(WAVES * _SMS[device], tiles)
    return max(1, min(16, _next_pow2(want), k_tiles))


class _Launch:
    """What a launch of ``kind`` with ``cfg`` for ``m`` rows needs besides the tensors: the kernel bound to its
    grid, the sizes, the constexprs and the split-K counters. Built once per layer and row count by
    :class:`LayerLauncher`, so a call only allocates the output (and split-K partials) and launches."""

    __slots__ = ("kernel", "sizes", "consts", "split", "locks")

    def __init__(self, kind: str, cfg: dict, m: int, n: int, k: int, zw: int, bits: int, group_size: int,
                 sym: bool, has_bias: bool, dtype: torch.dtype, device: torch.device):
        meta = dict(cfg)
        tiles = _cdiv(n, meta["BLOCK_N"]) * (1 if kind == "gemv" else _cdiv(m, meta["BLOCK_M"]))
        if not meta["SPLIT_K"]:  # 0: split K until the grid is about WAVES programs per multiprocessor
            meta["SPLIT_K"] = _auto_split(tiles, _cdiv(k, meta["BLOCK_K"]), device)
        self.split = meta["SPLIT_K"]
        self.locks = _locks(device, tiles) if self.split > 1 else None
        self.consts = dict(BITS=bits, GROUP_SIZE=group_size, SYM=sym, HAS_BIAS=has_bias, **meta)
        grid = (tiles, self.split)
        if kind == "gemv":
            self.kernel, self.sizes = gemv_kernel[grid], (n, k, zw)
            self.consts["STAGES"] = meta["num_stages"]
        else:
            self.kernel, self.sizes = gemm_kernel[grid], (m, n, k, zw)
            self.consts["DOT_F32"] = triton_interpret() and dtype == torch.bfloat16

    def __call__(self, x2, qweight, scales, qzeros, bias, y) -> None:
        if self.split > 1:
            ws = torch.empty((self.split, *y.shape), dtype=torch.float32, device=y.device)
            locks = self.locks
        else:
            ws = locks = y
        self.kernel(x2, qweight, scales, qweight if qzeros is None else qzeros, y if bias is None else bias, y,
                    ws, locks, *self.sizes, **self.consts)


def _launch(kind, cfg, x2, qweight, scales, qzeros, bias, y, bits, group_size):
    m, k = x2.shape
    zw = 0 if qzeros is None else qzeros.shape[1]
    _Launch(kind, cfg, m, qweight.shape[1], k, zw, bits, group_size, qzeros is None, bias is not None, x2.dtype,
            x2.device)(x2, qweight, scales, qzeros, bias, y)


def _rows_bucket(kind: str, m: int) -> int:
    return 1 if kind != "prefill" else min(_next_pow2(m), 4096)


def _problem_key(kind, m, n, k, bits, group_size, sym, has_bias, dtype, device) -> tuple:
    """The key ``TUNED`` keeps a launch config under (rows bucketed; see ``_choose``)."""
    return (kind, _rows_bucket(kind, m), n, k, bits, group_size, sym, has_bias, dtype, device)


def _choose(kind: str, key: tuple, launch, device: torch.device) -> dict:
    """The launch config for ``key``: timed once per process among ``CONFIGS[kind]`` (``launch(cfg)`` runs one)."""
    candidates = [c for c in CONFIGS[kind] if _fits(kind, c, key[4])]
    if triton_interpret() or device.type != "cuda":
        return candidates[0]
    cfg = TUNED.get(key)
    if cfg is not None:
        return cfg
    if torch.cuda.is_current_stream_capturing():
        logger.warning("hf_signround: no tuned Triton config for %s while a CUDA graph is captured; using the "
                       "default (run one eager forward before capturing to tune)", key[:8])
        return candidates[0]
    timings = []
    for cand in candidates:
        try:
            ms = triton.testing.do_bench(lambda c=cand: launch(c), warmup=5, rep=20, return_mode="median")
        except (OutOfResources, CompilationError, RuntimeError) as err:  # e.g. too much shared memory
            logger.debug("hf_signround: config %s failed for %s: %s", cand, key[:6], err)
            continue
        timings.append((cand, ms))
    if not timings:
        raise RuntimeError(f"no Triton config could be launched for {key[:8]}; use backend='torch'")
    cfg = min(timings, key=lambda t: t[1])[0]
    TUNED[key], TIMINGS[key] = cfg, timings
    logger.info("hf_signround: tuned %s kernel for N=%d K=%d bits=%d group=%d: %s", kind, key[2], key[3], key[4],
                key[5], cfg)
    return cfg


def _launch_dequant(cfg: dict, qweight, scales, qzeros, w, bits: int, group_size: int) -> None:
    k, n = w.shape
    meta = dict(cfg)
    grid = (_cdiv(k, meta["BLOCK_K"]), _cdiv(n, meta["BLOCK_N"]))
    zw = 0 if qzeros is None else qzeros.shape[1]
    dequant_kernel[grid](qweight, scales, qweight if qzeros is None else qzeros, w, n, k, zw, BITS=bits,
                         GROUP_SIZE=group_size, SYM=qzeros is None, **meta)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int, group_size: int,
               in_features: int, dtype: torch.dtype, *, config: dict | None = None) -> torch.Tensor:
    """The dense ``W.T`` ``(K, N)`` in ``dtype``, by one Triton kernel: the reference's float32 weight rounded once."""
    n = qweight.shape[1]
    w = torch.empty((in_features, n), dtype=dtype, device=qweight.device)
    key = _problem_key("dequant", 1, n, in_features, bits, group_size, qzeros is None, False, dtype, qweight.device)
    with _on_device(qweight.device):
        cfg = config or _choose("dequant", key, lambda c: _launch_dequant(c, qweight, scales, qzeros, w, bits,
                                                                          group_size), qweight.device)
        _launch_dequant(cfg, qweight, scales, qzeros, w, bits, group_size)
    return w


def _on_device(device: torch.device):
    """Triton launches (and times candidates) on the current device."""
    other_gpu = device.type == "cuda" and device.index != torch.cuda.current_device()
    return torch.cuda.device(device) if other_gpu else contextlib.nullcontext()


def quant_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    *,
    kernel: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W`` dequantized inside the Triton kernels.

    ``kernel`` (``"gemv"``, ``"decode"``, ``"prefill"``, ``"dequant"``) and ``config`` (one of
    ``triton_kernels.CONFIGS``' entries) force a choice; tests and benchmarks use them.
    """
    _check(x, qweight, scales, qzeros, bias, bits, group_size, in_features)
    n = qweight.shape[1]
    x2 = x.reshape(-1, in_features).contiguous()
    m = x2.shape[0]
    kind = kernel or kernel_for_rows(m)
    if kind == "gemv" and m > 1:
        raise ValueError(f"the gemv kernel takes one row of activations, got {m}")
    if kind not in CONFIGS:
        raise ValueError(f"kernel={kind!r} is not one of {sorted(CONFIGS)}")
    if kind == "dequant" and m:
        w = dequantize(qweight, scales, qzeros, bits, group_size, in_features, x.dtype, config=config)
        y = x2 @ w if bias is None else torch.addmm(bias.to(x.dtype), x2, w)
        return y.reshape(*x.shape[:-1], n)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    key = _problem_key(kind, m, n, in_features, bits, group_size, qzeros is None, bias is not None, x.dtype, x.device)
    with _on_device(x2.device):
        cfg = config or _choose(kind, key, lambda c: _launch(kind, c, x2, qweight, scales, qzeros, bias, y, bits,
                                                             group_size), x2.device)
        _launch(kind, cfg, x2, qweight, scales, qzeros, bias, y, bits, group_size)
    return y.reshape(*x.shape[:-1], n)


class LayerLauncher:
    """``quant_linear`` for one layer, with the per-call work cut to the input's: the stored tensors are
    checked once here, and each row count's launch (kernel, config, grid, constexprs) is resolved on its
    first call and kept. The eager path of the ``triton`` backend (``QuantLinear.prepare`` builds it);
    ``torch.compile`` goes through the ``hf_signround::quant_linear`` custom op instead.

    Calls take the stored tensors (not kept here) and must come with ``dtype`` activations on ``device``,
    as ``QuantLinear`` guarantees. Above ``DEQUANT_MIN_ROWS`` rows it runs ``quant_linear`` as is.
    """

    def __init__(self, qweight, scales, qzeros, bias, bits: int, group_size: int, in_features: int,
                 dtype: torch.dtype, device: torch.device):
        _check_dtype(dtype, bits, group_size)
        _check_stored(qweight, scales, qzeros, bias, bits, group_size, in_features, device)
        self.bits, self.group_size, self.in_features = bits, group_size, in_features
        self.n = qweight.shape[1]
        self.zw = 0 if qzeros is None else qzeros.shape[1]
        self.sym, self.has_bias = qzeros is None, bias is not None
        self.dtype, self.device = dtype, device
        self._launches: dict[int, _Launch] = {}  # rows -> launch, for 1..DEQUANT_MIN_ROWS rows

    def __call__(self, x, qweight, scales, qzeros, bias) -> torch.Tensor:
        k = self.in_features
        _check_input(x, k)
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if m == 0 or m > DEQUANT_MIN_ROWS:
            return quant_linear(x, qweight, scales, qzeros, bias, self.bits, self.group_size, k)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = torch.empty((m, self.n), dtype=x.dtype, device=x.device)
        launch = self._launches.get(m)
        with _on_device(x2.device):
            if launch is None:
                launch = self._resolve(m, x2, qweight, scales, qzeros, bias, y)
            launch(x2, qweight, scales, qzeros, bias, y)
        return y.view(*x.shape[:-1], self.n)

    def _resolve(self, m, x2, qweight, scales, qzeros, bias, y) -> _Launch:
        kind = kernel_for_rows(m)
        key = _problem_key(kind, m, self.n, self.in_features, self.bits, self.group_size, self.sym, self.has_bias,
                           self.dtype, self.device)
        cfg = _choose(kind, key, lambda c: _launch(kind, c, x2, qweight, scales, qzeros, bias, y, self.bits,
                                                   self.group_size), self.device)
        launch = _Launch(kind, cfg, m, self.n, self.in_features, self.zw, self.bits, self.group_size, self.sym,
                         self.has_bias, self.dtype, self.device)
        if key in TUNED or triton_interpret() or self.device.type != "cuda":
            self._launches[m] = launch  # not an untuned default taken while a CUDA graph was captured
        return launch
