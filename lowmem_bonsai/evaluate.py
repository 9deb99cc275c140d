"""Perplexity of a checkpoint through the streaming executor."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data import check_windows, load_tokenizer, tokenize_file, windows
from .engine.device import resolve_device
from .engine.forward import streamed_nll
from .model.checkpoint import Checkpoint
from .engine.memory import plan_memory
from .errors import UserError
from .model.config import ModelConfig
from .profiles import Profile

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EvalResult:
    perplexity: float
    nll: float  # mean next-token NLL (nats)
    tokens: int  # predicted positions
    seq_len: int
    sequences: int
    skip: int
    seconds: float
    model: str
    data: str
    dtype: str
    device: str = "cpu"
    # mean next-token NLL (nats) of each window, in the text's order: what a paired comparison of two
    # models on the same windows resamples (:func:`paired_below`)
    window_nll: tuple[float, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)  # window_nll, a tuple, is written as a JSON list


def perplexity_of(nll_sum: torch.Tensor, tokens: int) -> tuple[float, float]:
    mean = float(nll_sum.sum()) / tokens
    return math.exp(mean), mean


def eval_plan(config: ModelConfig, *, seq_len: int, batch_seqs: int, dtype: torch.dtype, prefetch: int,
              memory_gb: float) -> tuple[int, float]:
    """(windows per pass, planned peak GiB): the most windows (at most ``batch_seqs``) that fit.

    A pass over W windows holds what a prune's wave of W masks over one calibration window holds:
    the blocks, one hidden row per window, a row chunk's activations and the lm_head range; the
    peak is that sum (a prune's reconstruction and writing do not happen here).
    """
    batch = fit_batch(config, seq_len=seq_len, batch_seqs=batch_seqs, dtype=dtype, prefetch=prefetch,
                      memory_gb=memory_gb)
    name = str(dtype).removeprefix("torch.")
    probe = Profile(name="eval", memory_gb=memory_gb, compute_dtype=name, calib_seqs=1, seq_len=seq_len,
                    masks_per_round=batch + batch % 2, prefetch=prefetch)
    m = plan_memory(config, probe)
    return batch, (m.resident_blocks_gb + m.hidden_store_gb + m.activations_gb + m.head_gb
                   + m.runtime_gb)


def fit_batch(config: ModelConfig, *, seq_len: int, batch_seqs: int, dtype: torch.dtype, prefetch: int,
              memory_gb: float) -> int:
    """The most windows per pass (at most ``batch_seqs``) that the memory planner fits.

    A pass over W windows holds what a prune's wave of W masks over one calibration window holds:
    the blocks, one hidden row per window, a row chunk's activations and the lm_head range.
    """
    name = str(dtype).removeprefix("torch.")
    if batch_seqs < 1:
        raise UserError(f"--batch-seqs {batch_seqs}: expected at least 1 window per pass")
    want = batch_seqs + batch_seqs % 2  # the planner sizes masks in pairs
    probe = Profile(name="eval", memory_gb=memory_gb, compute_dtype=name, calib_seqs=1, seq_len=seq_len,
                    masks_per_round=max(2, want), prefetch=prefetch)
    try:
        wave = plan_memory(config, probe).wave_masks
    except UserError:
        raise UserError(f"memory budget {memory_gb:.1f} GiB is too small to evaluate this model: two "
                        f"blocks and two windows of {seq_len} tokens do not fit; pass a larger --memory "
                        "or a smaller --seq-len") from None
    if wave < batch_seqs:
        log.info("memory budget %.1f GiB: %d windows per pass instead of %d", memory_gb, wave, batch_seqs)
    return min(batch_seqs, wave)


def evaluate(
    *,
    model_dir: Path,
    data: Path,
    seq_len: int = 512,
    max_seqs: int | None = None,
    skip: int = 0,
    batch_seqs: int = 8,
    dtype: torch.dtype = torch.float32,
    prefetch: int = 1,
    device: str = "cpu",
    on_batch: Callable[[int, int], None] | None = None,
    memory_gb: float | None = None,
) -> EvalResult:
    """Perplexity of ``model_dir`` on ``data`` (protocol in :mod:`lowmem_bonsai.data`).

    Sequences go through the streamed model ``batch_seqs`` at a time: each batch reads every block
    once, so larger batches mean less I/O per token and a larger hidden-state store. With
    ``memory_gb`` (GiB) the batch shrinks to what the memory planner fits in it (on the CPU).
    """
    start = time.perf_counter()
    need = check_windows(seq_len=seq_len, max_seqs=max_seqs, skip=skip)
    if batch_seqs < 1:
        raise UserError(f"--batch-seqs {batch_seqs}: expected at least 1 window per pass")
    dev = resolve_device(device)
    ckpt = Checkpoint(model_dir)
    ids = tokenize_file(load_tokenizer(model_dir), data, max_tokens=need)
    seqs = windows(ids, seq_len=seq_len, max_seqs=max_seqs, skip=skip, source=str(data))
    if memory_gb is not None and dev.type == "cpu":  # on a GPU the host holds only blocks in flight
        batch_seqs, planned = eval_plan(ckpt.config, seq_len=seq_len, batch_seqs=batch_seqs,
                                        dtype=dtype, prefetch=prefetch, memory_gb=memory_gb)
        log.info("memory plan: %d windows per pass, peak %.2f GiB", batch_seqs, planned)
    sums = []  # NLL summed over each window's predicted positions
    for a in range(0, seqs.shape[0], batch_seqs):
        batch = seqs[a : a + batch_seqs]
        sums.append(streamed_nll(ckpt, batch, dtype=dtype, prefetch=prefetch, device=dev).reshape(-1))
        if on_batch is not None:
            on_batch(min(a + batch_seqs, seqs.shape[0]), seqs.shape[0])
    per_window = torch.cat(sums)
    total = per_window.sum()
    tokens = seqs.shape[0] * (seq_len - 1)
    if not torch.isfinite(total):
        raise ckpt.nonfinite_error(found="the perplexity")
    ppl, mean = perplexity_of(total, tokens)
    result = EvalResult(
        perplexity=ppl, nll=mean, tokens=tokens, seq_len=seq_len, sequences=seqs.shape[0], skip=skip,
        seconds=time.perf_counter() - start, model=str(model_dir), data=str(data),
        dtype=str(dtype).removeprefix("torch."), device=str(dev),
        window_nll=tuple((per_window / (seq_len - 1)).tolist()),
    )
    log.info("perplexity %.4f over %d tokens", ppl, tokens)
    return result


@dataclass(frozen=True, slots=True)
class PairedBelow:
    """How far the mean perplexity of some models lies below a reference's, on the same windows."""

    reference: float  # the reference's perplexity
    mean: float  # the mean of the others' perplexities (e.g. one method's seeds)
    below: float  # 1 - mean / reference: 0.1 means 10 % lower perplexity than the reference
    low: float  # the central interval of ``below`` over window resamples (``level``, e.g. 95 %)
    high: float
    level: float
    windows: int
    samples: int
    share_at_least: float | None = None  # share of resamples with ``below`` >= ``goal``
    goal: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def paired_below(reference: Sequence[float], others: Sequence[Sequence[float]], *, samples: int = 10_000,
                 level: float = 0.95, goal: float | None = None, seed: int = 0) -> PairedBelow:
    """A paired bootstrap over windows of ``1 - mean(ppl of others) / ppl of reference``.

    Each argument holds mean next-token NLLs per window (:attr:`EvalResult.window_nll`), all on the
    same windows of equal length, so a perplexity is exp(mean over windows). Every resample draws
    the windows with replacement once and applies the same draw to every model, so what the
    interval measures is how much the comparison depends on which text was held out; the models
    themselves (e.g. the seeds in ``others``) are not resampled.
    """
    ref = torch.tensor(list(reference), dtype=torch.float64)
    if ref.ndim != 1 or ref.numel() < 2:
        raise UserError(f"a paired comparison needs per-window NLLs of at least 2 windows, got {ref.numel()}")
    if not others:
        raise UserError("a paired comparison needs at least one model to compare with the reference")
    rows = [list(o) for o in others]
    if any(len(r) != ref.numel() for r in rows):
        raise UserError(f"every model must be measured on the same windows: the reference has {ref.numel()}, "
                        f"the others {sorted({len(r) for r in rows})}")
    oth = torch.tensor(rows, dtype=torch.float64)  # (M, W)
    if not (torch.isfinite(ref).all() and torch.isfinite(oth).all()):
        raise UserError("a per-window NLL is NaN or Inf: the comparison needs finite perplexities")
    if samples < 100 or not 0.5 <= level < 1:
        raise UserError(f"samples {samples} / level {level}: expected at least 100 resamples and a level "
                        "in [0.5, 1)")

    def below(idx: torch.Tensor) -> torch.Tensor:  # idx (R, W) -> (R,)
        return 1 - oth[:, idx].mean(-1).exp().mean(0) / ref[idx].mean(-1).exp()

    point = float(below(torch.arange(ref.numel()).unsqueeze(0))[0])
    gen = torch.Generator().manual_seed(seed)
    draws = below(torch.randint(ref.numel(), (samples, ref.numel()), generator=gen))
    tail = (1 - level) / 2
    low, high = torch.quantile(draws, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return PairedBelow(
        reference=math.exp(float(ref.mean())), mean=float(oth.mean(-1).exp().mean()), below=point,
        low=low, high=high, level=level, windows=ref.numel(), samples=samples, goal=goal,
        share_at_least=None if goal is None else float((draws >= goal).double().mean()),
    )
