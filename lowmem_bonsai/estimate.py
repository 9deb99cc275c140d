"""`lowmem-bonsai estimate`: the prune's memory, disk, FLOPs and time, before any work."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint
from .config import DTYPES
from .device import free_bytes, resolve_device
from .memory import DTYPE_BYTES, STORAGE_BYTES, measure_matmul_gflops, pick_compute_dtype, plan_memory
from .profiles import Profile
from .prune import check_settings


def estimate(*, model_dir: Path, profile: Profile, sparsity: float, method: str = "bonsai",
             measure_seconds: float = 1.0) -> dict[str, Any]:
    check_settings(sparsity=sparsity, method=method)
    ckpt = Checkpoint(model_dir)
    cfg = ckpt.config
    sample = ckpt.tensors[ckpt.name("down", 0)]
    storage = STORAGE_BYTES.get(sample.dtype, 4)
    if profile.storage_dtype != "auto":
        storage = DTYPE_BYTES[profile.storage_dtype]
    # A GPU profile is planned from device_memory_gb where no GPU is visible (the ETA then needs one).
    device = resolve_device(profile.device) if profile.device == "cpu" or torch.cuda.is_available() else None
    mem = plan_memory(cfg, profile, storage_bytes=storage,
                      device_free_bytes=free_bytes(device) if device is not None else None)
    total = cfg.non_embedding_params()
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    rounds = math.ceil(sparsity / profile.prune_frac - 1e-9)
    t = profile.seq_len
    masks = profile.masks_per_round if method == "bonsai" else 0
    tokens_per_round = profile.calib_seqs * t * (1 + masks)
    flops = []
    for r in range(rounds):
        kept = total * (1 - min(r * profile.prune_frac, sparsity))  # entering round r+1
        per_token = 2 * (kept + cfg.vocab_size * cfg.hidden_size)
        attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * t  # QK^T + PV, causal
        flops.append(tokens_per_round * (per_token + attn))
    if device is not None:
        dtype_name, rates = pick_compute_dtype(profile.compute_dtype, device)
        gflops = measure_matmul_gflops(DTYPES[dtype_name], seconds=measure_seconds, device=device)
    else:
        dtype_name, rates, gflops = profile.compute_dtype, {}, float("nan")
    out_bytes = (total * (1 - sparsity) + embed) * storage
    return {
        "model": str(model_dir),
        "profile": profile.name,
        "device": profile.device,
        "sparsity": sparsity,
        "method": method,
        "params_total": total + embed,
        "params_blocks": total,
        "rounds": rounds,
        "memory": mem.to_json(),
        "disk_output_gb": out_bytes / 1024**3,
        "forward_tokens_per_round": tokens_per_round,
        "forward_tflops_per_round": [f / 1e12 for f in flops],
        "forward_tflops_total": sum(flops) / 1e12,
        "compute_dtype": dtype_name,
        "matmul_gflops_by_dtype": rates,
        # The executor reached 85-95% of the matmul rate on SmolLM2 in fp32 (README); ETA assumes 80%.
        # No ETA (null) for a GPU profile where no GPU is visible to measure.
        "eta_hours": sum(flops) / (0.8 * gflops * 1e9) / 3600 if math.isfinite(gflops) else None,
        "matmul_gflops_measured": gflops if math.isfinite(gflops) else None,
    }
