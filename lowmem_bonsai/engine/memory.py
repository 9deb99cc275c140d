"""Memory planner: what a prune will hold at its peak, sized before any work starts.

From the model's geometry and the profile it sizes the resident blocks, the hidden-state store of one
wave of masks, the activations of one row chunk and the lm_head chunk, picks the largest wave of
masks that fits ``memory_gb``, and refuses (saying what to change) when not even two masks fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import UserError
from ..model.config import DTYPES, ModelConfig
from ..profiles import Profile
from ..settings import AUTO, DType, names
from .block import STATS_ELEMENTS
from .device import synchronize

DTYPE_BYTES = {AUTO: 4, **{name: dt.itemsize for name, dt in DTYPES.items()}}  # auto: the widest
STORAGE_BYTES = {"F32": 4, "BF16": 2, "F16": 2}
LOGIT_BUDGET = 1 << 25  # logits the forward holds at once (elements): 128 MB in fp32
# Reconstruction solves in fp64 up to this many inputs per projection, in fp32 above (a 13B
# model's 13,824 MLP channels), so that a layer's solve holds two Gram matrices, not five.
SOLVE_FP64_MAX = 4096
# The repair's greedy elimination of MLP channels defers its downdates over this many drops and
# applies them as one matmul (reconstruct.greedy_keep; its factors are counted in the plan).
ELIMINATION_BLOCK = 64
RUNTIME_GB = 0.35  # python, torch and tokenizers loaded (measured peak_anon of an idle import: 0.14 GiB)


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Peak memory by component, GiB. On a GPU (``device`` cuda) the hidden-state store, one block,
    the activations and the lm_head state live in device memory and are summed in ``device_total_gb``;
    the host holds the blocks being loaded and the runtime, summed in ``total_gb``."""

    wave_masks: int  # masks per streamed pass
    waves: int  # passes per round
    resident_blocks_gb: float  # (prefetch + 1) blocks in the compute dtype + one source tensor (host)
    hidden_store_gb: float  # wave x calib tokens x hidden
    activations_gb: float  # one row chunk inside a block (+ attention scores)
    head_gb: float  # lm_head / embedding row range + logits of one chunk + loss state
    runtime_gb: float
    total_gb: float  # host peak
    budget_gb: float  # host budget (memory_gb)
    device: str = "cpu"
    device_block_gb: float = 0.0  # the computing block's copy on the GPU
    device_total_gb: float = 0.0
    device_budget_gb: float = 0.0
    # reconstruction (after the rounds, never at the same time): dense fp32 blocks, the calibration
    # stream, one row chunk, the Gram matrix of the widest projection input and its solve (fp64)
    reconstruction_gb: float = 0.0
    # writing the pruned checkpoint (after both): one tensor read, sliced and cast at a time
    write_gb: float = 0.0
    # importing a GGUF source first (prune FILE.gguf), before everything else
    import_gb: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def block_bytes(config: ModelConfig, dtype_bytes: int) -> int:
    """Largest block of the model, in the compute dtype."""
    return max(config.layer_params(i) for i in range(config.num_hidden_layers)) * dtype_bytes


DEVICE_RUNTIME_GB = 0.6  # CUDA context, cuBLAS workspace, allocator slack (not measured here: no GPU)


def plan_memory(config: ModelConfig, profile: Profile, *, storage_bytes: int = 2,
                device_free_bytes: int | None = None, source_bytes: int | None = None) -> MemoryPlan:
    """Size every component of a prune's peak; pick the wave size; refuse if nothing fits.

    ``storage_bytes`` per element of the written shards, ``source_bytes`` of the source's (default:
    the same).

    For a GPU profile the wave is sized from the device budget: ``device_memory_gb``, or 90% of
    ``device_free_bytes`` (what the GPU reports free) when that is 0.
    """
    gb = 1024**3
    b = DTYPE_BYTES[profile.compute_dtype]
    h = config.hidden_size
    widest = max(config.layers, key=lambda s: s.intermediate_size)
    most_heads = max(s.num_attention_heads for s in config.layers)
    largest_tensor = max(widest.intermediate_size, most_heads * config.head_dim) * h * storage_bytes
    resident = (profile.prefetch + 1) * block_bytes(config, b) + largest_tensor
    t = profile.seq_len
    chunk = max(1, profile.chunk_tokens // t) * t  # tokens in one row chunk
    qkv = (most_heads + 2 * config.num_key_value_heads) * config.head_dim
    per_token = (qkv + 3 * h + 3 * widest.intermediate_size) * b  # qkv, norms/residual, gate|up, act
    scores = max(1, profile.chunk_tokens // t) * most_heads * t * t * 4  # if SDPA materialises them
    activations = chunk * per_token + scores + 2 * STATS_ELEMENTS * 8  # + the prior pass's fp64 slice (x2: headroom)
    tokens_per_mask = profile.calib_seqs * t
    vocab_rows = max(256, LOGIT_BUDGET // max(chunk, 1))
    head = LOGIT_BUDGET * 4 * 3 + vocab_rows * h * (b + storage_bytes)
    per_mask = tokens_per_mask * (h * b + 3 * 4)  # hidden row + loss state (max, sum, target)
    on_gpu = profile.device != "cpu"
    if on_gpu:
        host_fixed = resident + RUNTIME_GB * gb
        if host_fixed > profile.memory_gb * gb:
            raise UserError(f"profile '{profile.name}': host memory budget {profile.memory_gb:g} GB is too "
                            f"small for {profile.prefetch + 1} blocks being loaded "
                            f"({host_fixed / gb:.1f} GB); raise memory_gb or lower prefetch")
        if profile.device_memory_gb:
            budget = profile.device_memory_gb * gb
        elif device_free_bytes is not None:
            budget = 0.9 * device_free_bytes
        else:
            raise UserError(f"profile '{profile.name}': device_memory_gb = 0 means 'what the GPU has "
                            "free', and no GPU is visible here to ask; set device_memory_gb to plan")
        fixed = block_bytes(config, b) + activations + head + DEVICE_RUNTIME_GB * gb
        where = f"device memory budget {budget / gb:.1f} GB"
    else:
        budget = profile.memory_gb * gb
        fixed = resident + activations + head + RUNTIME_GB * gb
        where = f"memory budget {profile.memory_gb:g} GB"
    room = budget - fixed
    fit = int(room // per_mask) if room > 0 else 0
    wave = profile.wave_masks or min(profile.masks_per_round, fit - fit % 2)
    if wave < 2 or (profile.wave_masks and fixed + wave * per_mask > budget):
        need = (fixed + 2 * per_mask) / gb
        raise UserError(
            f"profile '{profile.name}': {where} is too small: "
            f"{'a block' if on_gpu else 'two blocks'}, activations and 2 masks need {need:.1f} GB for "
            f"this model; raise {'device_memory_gb' if on_gpu else 'memory_gb (or --memory)'}, or lower prefetch, "
            "chunk_tokens, calib_seqs or seq_len, or use compute_dtype bfloat16"
        )
    wave = max(2, wave - wave % 2)
    # the prior pass holds the hidden rows of all its windows (prior_seqs may exceed a wave's)
    prior_rows = profile.prior_windows * t * (h * b + 3 * 4)
    total = fixed + max(wave * per_mask, prior_rows)
    if total > budget and prior_rows > wave * per_mask:
        raise UserError(f"profile '{profile.name}': {where} is too small for the prior pass over "
                        f"{profile.prior_windows} windows ({total / gb:.1f} GB); lower prior_seqs")
    repair = repair_bytes(config, profile, storage_bytes=storage_bytes) if profile.reconstruct != "none" else 0
    if repair > profile.memory_gb * gb:
        raise UserError(
            f"profile '{profile.name}': memory budget {profile.memory_gb:g} GB is too small for the "
            f"reconstruction ({repair / gb:.1f} GB); lower reconstruct_seqs or reconstruct_seq_len, or "
            "set reconstruct = \"none\"")
    write = write_bytes(config, source_bytes=source_bytes or storage_bytes,
                        storage_bytes=storage_bytes)
    gpu = dict(device=profile.device, device_block_gb=block_bytes(config, b) / gb,
               device_total_gb=total / gb, device_budget_gb=budget / gb) if on_gpu else {}
    return MemoryPlan(
        wave_masks=wave, waves=math.ceil(profile.masks_per_round / wave),
        resident_blocks_gb=resident / gb, hidden_store_gb=max(wave * per_mask, prior_rows) / gb,
        activations_gb=activations / gb, head_gb=head / gb, runtime_gb=RUNTIME_GB,
        total_gb=max(host_fixed if on_gpu else total, repair, write) / gb, budget_gb=profile.memory_gb,
        reconstruction_gb=repair / gb, write_gb=write / gb, **gpu,
    )


def repair_bytes(config: ModelConfig, profile: Profile, *, storage_bytes: int = 2) -> int:
    """Peak bytes of the reconstruction (reconstruct.py) on the host, counted as if its passes
    computed in fp32. With a 2-byte reconstruct_dtype the resident blocks and the activations take
    half of that, which holds the copies that dtype adds: the chunk's stream cast down, the
    moments' inputs cast up (chunk x in), a solve's fp32 copy of the source projection (out x in,
    a no-op with fp32 blocks) and the stream's cast-up update; each is far smaller than one
    block's half (tests/test_memory_bound.py runs the bf16 repair under the plan). A gap-weighted
    repair (reconstruct_gap_weight) is two repairs one after the other, and between them the head
    over both final streams, after the blocks, the chunk's activations and the last solve are freed:
    a chunk of LOGIT_BUDGET logits (128 MB) and the head's rows for it (168 MB on Llama-2-13B, 19 MB
    on SmolLM2), less than those, so the peak is one repair's."""
    h, b = config.hidden_size, 4
    widest = max(s.intermediate_size for s in config.layers)
    n = max(widest, max(s.num_attention_heads for s in config.layers) * config.head_dim) + 1
    blocks = (profile.prefetch + 1) * block_bytes(config, b) + (n - 1) * h * storage_bytes
    t = profile.reconstruct_seq_len
    explicit = profile.reconstruct_target != "layer"  # the dense model's stream and cross moments too
    stream = (1 + explicit) * profile.repair_seqs * t * h * b
    chunk = max(1, profile.chunk_tokens // t) * t
    qkv = (max(s.num_attention_heads for s in config.layers) + 2 * config.num_key_value_heads) * config.head_dim
    activations = chunk * (qkv + 3 * h + 3 * widest + n) * b  # + the chunk's [z, 1] for the Gram
    # the Gram accumulator (fp32), its fp64 copy and the system; W G, X and the errors (out x in).
    # Above SOLVE_FP64_MAX inputs the solve is fp32 and works in the accumulator: no copy.
    s = 8 if n - 1 <= SOLVE_FP64_MAX else 4
    solve = n * n * (4 + (s if s == 8 else 0) + s) + 3 * h * n * s
    if profile.reconstruct_reselect:  # greedy_keep, before the solve: the accumulator, its copy
        # (fp64: the full G; fp32: a copy to regularise), the inverse and the Cholesky factor (or, where
        # that fails, LU's copy); W* (out x in)
        # and its squares; a block's factors (two of n, one of out, per deferred drop)
        solve = max(solve, n * n * (4 + 3 * s) + 2 * h * n * s + (2 * n + h) * ELIMINATION_BLOCK * s)
    if explicit:  # the cross accumulator (fp32), its copy in the solve's dtype; the chunk's targets
        solve += h * n * (4 + s) + chunk * (2 * h + n) * b
    return int(blocks + stream + activations + solve + RUNTIME_GB * 1024**3)


def write_bytes(config: ModelConfig, *, source_bytes: int, storage_bytes: int) -> int:
    """Peak bytes of writing a pruned checkpoint (outputs/writer.py): the streaming shard writer
    holds one tensor at a time: read from the source, sliced to the plan (block tensors), cast to
    the storage dtype where that differs."""
    h = config.hidden_size
    block_tensor = max(max(s.intermediate_size, s.num_attention_heads * config.head_dim)
                       for s in config.layers) * h
    cast = storage_bytes if storage_bytes != source_bytes else 0
    whole = config.vocab_size * h * (source_bytes + cast)  # embedding, lm_head: read (and cast)
    sliced = block_tensor * (2 * source_bytes + cast)  # read, index_select (and cast)
    return int(max(whole, sliced) + RUNTIME_GB * 1024**3)


_PICKED: dict[str, tuple[str, dict[str, float]]] = {}


def pick_compute_dtype(requested: str, device: torch.device | None = None) -> tuple[str, dict[str, float]]:
    """The profile's dtype, or for "auto" the one with the fastest measured matmul here.

    Measured, not assumed: the fastest dtype differs between machines of the same kind (README,
    Profiles). Returns (name, {dtype: GFLOP/s}); the choice is cached per process and device.
    """
    if requested != AUTO:
        return requested, {}
    dev = device if device is not None else torch.device("cpu")
    key = str(dev)
    if key not in _PICKED:
        small = dict(n=512, k=1024) if dev.type == "cpu" else {}  # a quick pick on a CPU
        rates = {name: measure_matmul_gflops(getattr(torch, name), seconds=0.3, device=dev, **small)
                 for name in names(DType)}
        _PICKED[key] = (max(rates, key=rates.get), rates)
    name, rates = _PICKED[key]
    return name, dict(rates)


def measure_matmul_gflops(dtype: torch.dtype, *, n: int | None = None, k: int | None = None,
                          seconds: float = 1.0, device: torch.device | None = None) -> float:
    """A matmul rate of this machine (or GPU) in ``dtype`` (GFLOP/s), measured for about ``seconds``.

    (n x k) @ (k x k); by default 1024 x 2048 on a CPU and 8192 x 8192 on a GPU, which needs a large
    GEMM to reach its rate.
    """
    dev = device if device is not None else torch.device("cpu")
    big = dev.type != "cpu"
    n = n or (8192 if big else 1024)
    k = k or (8192 if big else 2048)
    a = torch.randn(n, k).to(device=dev, dtype=dtype)
    w = torch.randn(k, k).to(device=dev, dtype=dtype)
    torch.nn.functional.linear(a, w)  # warm-up
    synchronize(dev)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.nn.functional.linear(a, w)
        count += 1
        if big and count % 16 == 0:
            synchronize(dev)  # the clock measures queued kernels only once they ran
    synchronize(dev)
    return 2 * n * k * k * count / (time.perf_counter() - start) / 1e9


def measure_read_gbps(*, rows: int = 4096, cols: int = 8192, seconds: float = 0.3) -> float:
    """The rate (GB/s) at which a vector-matrix product reads a float32 matrix far larger than a
    CPU's caches (128 MiB by default), measured for about ``seconds``: what bounds the repair's
    greedy elimination of MLP channels, which reads its refit (out x in) once per dropped channel."""
    a = torch.randn(rows, cols)
    v = torch.randn(rows)
    v @ a  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        v @ a
        count += 1
    return a.numel() * a.element_size() * count / (time.perf_counter() - start) / 1e9
