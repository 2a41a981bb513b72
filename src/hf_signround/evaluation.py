"""Model quality and speed measurements: held-out perplexity and generation throughput."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import StoppingCriteria

from .calibration import token_windows

logger = logging.getLogger(__name__)

__all__ = ["heldout_windows", "perplexity", "tokens_per_second"]


def heldout_windows(
    tokenizer: Any, texts: Sequence[str] | str, n_windows: int = 40, seqlen: int = 512
) -> torch.Tensor:
    """Return ``n_windows`` evenly spaced ``seqlen``-token windows of ``texts`` as a LongTensor.

    The texts are joined with blank lines and tokenized once without special
    tokens; the stream is cut into consecutive non-overlapping windows and the
    ones at ``round(linspace(0, W - 1, n_windows))`` are kept, so every part
    of the text is represented.
    """
    if n_windows <= 0 or seqlen <= 0:
        raise ValueError(f"n_windows and seqlen must be positive, got {n_windows} and {seqlen}")
    if isinstance(texts, str):
        texts = [texts]
    joined = "\n\n".join(texts)
    # verbose=False: the joined text is far longer than model_max_length on purpose.
    ids = tokenizer(joined, add_special_tokens=False, verbose=False)["input_ids"]
    stream = torch.as_tensor(ids, dtype=torch.long)
    windows = token_windows(stream, seqlen, n_windows, "held-out", "n_windows")
    total = len(windows)
    # float64 so the rounding is not disturbed by float32 error on long streams.
    idx = torch.linspace(0, total - 1, n_windows, dtype=torch.float64).round().long()
    logger.info("held-out: %d tokens, %d windows, using %d", stream.numel(), total, n_windows)
    return windows[idx].clone()


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def perplexity(model: Any, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Perplexity of ``model`` on token ``windows`` (n, seqlen).

    Every position 1.. is predicted from the tokens before it within its window;
    the NLL is summed over all predicted tokens and ``exp(mean)`` returned.
    Log-softmax runs in float32 regardless of the model dtype.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a (n, seqlen>=2) tensor, got shape {tuple(windows.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    nll = 0.0
    count = 0
    try:
        with torch.no_grad(), tqdm(total=windows.shape[0], desc="perplexity", unit="window", leave=False) as bar:
            for start in range(0, windows.shape[0], batch_size):
                batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)
                logits = model(input_ids=batch).logits
                pred = logits[:, :-1].float()
                target = batch[:, 1:]
                loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")
                # Accumulate on the host in double: many windows of summed NLL lose digits in float32.
                nll += float(loss.double())
                count += target.numel()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    return math.exp(nll / count)


class _CountTokens(StoppingCriteria):
    """Never stops generation; advances a progress bar once per generated token.

    A stopping criterion is called once per decoding step and needs no device synchronisation,
    unlike a streamer (which copies each token to the host), so the bar leaves the timing as it was.
    """

    def __init__(self, bar: tqdm):
        self.bar = bar

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self.bar.update(1)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def tokens_per_second(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 32) -> float:
    """Greedy-generation throughput in new tokens per second (timing only ``generate``).

    A progress bar counts the tokens as they are generated.
    """
    device = _model_device(model)
    enc = tokenizer(prompt, return_tensors="pt")
    input_ids = enc["input_ids"].to(device)
    attention_mask = enc.get("attention_mask")
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=max_new_tokens, desc="generating", unit="token", leave=False) as bar:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                stopping_criteria=[_CountTokens(bar)],
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - t0
    finally:
        model.train(was_training)
    new_tokens = out.shape[1] - input_ids.shape[1]
    tps = new_tokens / elapsed if elapsed > 0 else float("inf")
    logger.info("generated %d tokens in %.3f s (%.1f tok/s)", new_tokens, elapsed, tps)
    return tps
