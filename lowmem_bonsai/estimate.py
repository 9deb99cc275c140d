"""`lowmem-bonsai estimate`: the prune's memory, disk, FLOPs and time, before any work."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from .engine.device import free_bytes, resolve_device
from .chat import chat_template, read_tokenizer_config
from .errors import UserError
from .engine.memory import (DTYPE_BYTES, ELIMINATION_BLOCK, SOLVE_FP64_MAX, STORAGE_BYTES, measure_matmul_gflops,
                            measure_read_gbps, pick_compute_dtype, plan_memory)
from .method.prune import check_settings, planned_rounds
from .model.checkpoint import Checkpoint
from .model.config import DTYPES, parse_config
from .llamacpp.from_gguf import gguf_config, gguf_import_peak_bytes, is_gguf_model
from .profiles import Profile
from .method.reconstruct import passes, repairs_of
from .settings import AUTO, Method, RepairTarget


def mlp_elimination(n_in: int, out: int, drops: int, *, layer_target: bool = False) -> tuple[float, float, float]:
    """The work of reconstruct.greedy_keep on ``n_in`` channels of a projection with ``out``
    outputs, dropping ``drops``: (the start's flops, the drops' flops, the bytes the drops read),
    flops counted as float32's (fp64, up to SOLVE_FP64_MAX inputs, twice). See :func:`estimate`."""
    n = n_in + 1
    elem = 8 if n_in <= SOLVE_FP64_MAX else 4
    # the inverse from the Cholesky factor (n^3 / 3 + 2 n^3 / 3), then W* = C A^-1; the target
    # W z forms C = W G first
    start = n ** 3 + 2 * out * n ** 2 * (1 + layer_target)
    reads = drops * elem * (out * n * (1 + 3 / ELIMINATION_BLOCK) + 1.5 * ELIMINATION_BLOCK * n)
    return start * elem / 4, drops * 2 * n * (n + out) * elem / 4, reads


def heads_elimination(n_heads: int, head_dim: int, out: int, drops: int, *, layer_target: bool = False) -> float:
    """The flops of reconstruct.greedy_heads on o_proj's ``n_heads`` heads of ``head_dim`` columns,
    ``out`` outputs, dropping ``drops`` heads (groups counted as their heads), as float32's (fp64,
    up to SOLVE_FP64_MAX inputs, twice): the start as :func:`mlp_elimination`'s (the inverse and
    the refit), per dropped head the downdates of the refit and the inverse (one matmul each, 2 x
    head_dim x n (n + out)), and at most every head's score per step (a head_dim solve against the
    refit's columns, 2/3 head_dim^3 + 2 head_dim^2 out)."""
    n_in = n_heads * head_dim
    n = n_in + 1
    start = mlp_elimination(n_in, out, 0, layer_target=layer_target)[0]  # the same start, fp64 counted
    downdates = drops * 2 * head_dim * n * (n + out)
    scores = drops * n_heads * (2 / 3 * head_dim ** 3 + 2 * head_dim ** 2 * out)
    return start + (downdates + scores) * (2 if n_in <= SOLVE_FP64_MAX else 1)


def pass_efficiency(repair_dtype: str | None) -> float:
    """The share of the probe's matmul rate the repair's passes through the blocks reach: 0.8 for
    float32, as elsewhere (modelled 164.4 s, measured 161.9 s on the 13B shape); 2/3 for bfloat16,
    and for float16, which was not timed and is assumed like bfloat16. Why: on Llama-2-13B's shape
    the bf16 passes ran at about 66 % of the probe's bf16 rate (tools/bench_repair_dtype.py,
    tools/results/repair_dtype_13b.json: 117.0 s where 0.8 gave 107.0 s). The 13B-shaped prune of
    tools/results/memory_bound.json (profile:laptop-16gb:prior, bf16 passes), run before the
    change, agrees: it took 0.63 h, 0.8 gave 0.56 h, 2/3 gives 0.59 h (the elimination is known to
    be counted low). A share measured on one CPU, not derived."""
    return 0.8 if repair_dtype in (None, "float32") else 2 / 3


def estimate(*, model_dir: Path, profile: Profile, sparsity: float, method: str = Method.BONSAI,
             measure_seconds: float = 1.0, ranks: int = 1) -> dict[str, Any]:
    """A GGUF as ``model_dir`` is estimated from its metadata alone, as the checkpoint `prune` would
    import it into (float16); the import's size is counted in the disk needed.

    With ``ranks`` (a distributed prune, one machine like this one per rank), each rank passes its
    share of the calibration windows and of each round's masks (whole waves, then slices of the
    waves of a last step with fewer waves than ranks), and of the reconstruction's windows (its
    solves run on every rank).
    """
    check_settings(sparsity=sparsity, method=method, profile=profile)
    if ranks < 1:
        raise UserError(f"--ranks {ranks}: expected at least 1")
    if ranks > profile.calib_seqs:
        raise UserError(f"--ranks {ranks}: a distributed prune needs at least one calibration window per "
                        f"rank; the profile has calib_seqs = {profile.calib_seqs}")
    if is_gguf_model(model_dir):
        cfg = parse_config(gguf_config(gguf_path=model_dir, dtype="float16"), source=str(model_dir))
        storage = source = import_bytes = DTYPE_BYTES["float16"]
    else:
        ckpt = Checkpoint(model_dir)
        cfg = ckpt.config
        sample = ckpt.tensors[ckpt.name("down", 0)]
        storage, import_bytes = STORAGE_BYTES.get(sample.dtype, 4), 0
        source = storage
    if profile.storage_dtype != AUTO:
        storage = DTYPE_BYTES[profile.storage_dtype]
    # A GPU profile is planned from device_memory_gb where no GPU is visible (the ETA then needs one).
    device = resolve_device(profile.device) if profile.device == "cpu" or torch.cuda.is_available() else None
    mem = plan_memory(cfg, profile, storage_bytes=storage, source_bytes=source,
                      device_free_bytes=free_bytes(device) if device is not None else None)
    if is_gguf_model(model_dir):  # the import comes first; its peak is part of the prune's
        imported_gb = gguf_import_peak_bytes(gguf_path=model_dir) / 1024**3
        mem = dataclasses.replace(mem, import_gb=imported_gb, total_gb=max(mem.total_gb, imported_gb))
    total = cfg.non_embedding_params()
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    rounds = planned_rounds(profile, sparsity, method)
    t = profile.seq_len
    masks = profile.masks_per_round if method == Method.BONSAI else 0
    tokens_per_round = t * (profile.prior_windows + profile.calib_seqs * masks)
    # The slowest rank's share of a round: its windows of the prior pass, a whole wave per step of
    # one wave per rank, then its slice of each of the last step's waves (prune.wave_shares).
    rank_seqs = math.ceil(profile.prior_windows / ranks)
    rank_masks = 0
    if masks:
        full, rest = divmod(mem.waves, ranks)
        rank_masks = min(masks, full * mem.wave_masks + rest * math.ceil(mem.wave_masks / ranks))
    rank_tokens_per_round = t * (rank_seqs + profile.calib_seqs * rank_masks)
    flops, rank_flops = [], []
    for r in range(rounds):
        kept = total * (1 - min(r * profile.prune_frac, sparsity))  # entering round r+1
        per_token = 2 * (kept + cfg.vocab_size * cfg.hidden_size)
        attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * t  # QK^T + PV, causal
        flops.append(tokens_per_round * (per_token + attn))
        rank_flops.append(rank_tokens_per_round * (per_token + attn))
    repair_tokens = repair_flops = rank_repair_flops = rank_pass_flops = read_bytes = 0
    # the final repair (twice with reconstruct_gap_weight), and with reconstruct_in_rounds one more
    # before every round after the first
    final_repairs = repairs_of(profile)
    repairs = final_repairs + (rounds - 1 if profile.reconstruct_in_rounds else 0)
    # no repair reads no windows; a checkpoint without a chat template reads plain text only
    repairing = profile.reconstruct != "none"
    has_chat = (repairing and profile.chat_seqs > 0
                and chat_template(model_dir, read_tokenizer_config(model_dir)) is not None)
    seqs = (profile.repair_seqs if has_chat else profile.reconstruct_seqs) if repairing else 0  # the repair's windows
    if repairing:
        # The repair runs on the CPU, whatever the profile's compute dtype and device: the passes
        # of the blocks in reconstruct_dtype (one one-shot, two sequential, three with the dense
        # model's stream beside); in float32 (fp64 solves up to SOLVE_FP64_MAX inputs, counted
        # twice) the Gram matrices of both projections' inputs (and the cross moments with an
        # explicit target) and one solve each on the kept inputs (the plan's widths are not known
        # yet: the sparsity's share)
        t_r = profile.reconstruct_seq_len
        repair_tokens = (passes(profile.reconstruct_target, profile.reconstruct_sequential)
                         * seqs * t_r)
        cross = profile.reconstruct_target != RepairTarget.LAYER
        grams = sum((s.num_attention_heads * cfg.head_dim + 1) ** 2 + (s.intermediate_size + 1) ** 2
                    + cross * cfg.hidden_size * (s.num_attention_heads * cfg.head_dim + s.intermediate_size + 2)
                    for s in cfg.layers)
        lsq = profile.reconstruct == "lsq"
        h = cfg.hidden_size

        def solve(n_in: int) -> float:
            """One projection's solve (lsq: Cholesky of the kept inputs' Gram, the out right-hand
            sides, the errors before and after; the target W z first forms W G), fp64 counted twice."""
            a = (1 - sparsity) * n_in + 1
            flops = 1 / 3 * a ** 3 + 6 * h * a ** 2 + (not cross) * 2 * h * n_in ** 2
            return lsq * flops * (2 if n_in <= SOLVE_FP64_MAX else 1)

        solves = sum(solve(s.num_attention_heads * cfg.head_dim) + solve(s.intermediate_size) for s in cfg.layers)
        attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * t_r  # per token
        calib_tokens = seqs * t_r  # each adds to the moments once
        pass_flops = repair_tokens * (2 * total + attn)
        repair_flops = pass_flops + 2 * calib_tokens * grams + solves
        share = math.ceil(seqs / ranks) / seqs  # the busiest rank's windows
        rank_pass_flops = share * pass_flops
        rank_repair_flops = share * (repair_flops - solves - pass_flops) + solves  # float32's part
        repair_tokens, repair_flops, rank_repair_flops, rank_pass_flops = (repairs * x for x in (
            repair_tokens, repair_flops, rank_repair_flops, rank_pass_flops))
        if final_repairs > 1:  # the first repair's two final streams through the head, for the gaps
            head = 2 * 2 * seqs * t_r * cfg.vocab_size * h
            repair_flops += head
            rank_repair_flops += share * head
        # the final repair's reselection (twice with reconstruct_gap_weight; the repairs between the
        # rounds never reselect), every rank
        # alike. MLP channels (reconstruct.greedy_keep): the refit on every input and its inverse
        # (n^3 + 2 out n^2, n = in + 1, the inverse from the Cholesky factor; tools/bench_reselect.py
        # times it against this model on the 13B shape; tools/results/reselect_13b.json still
        # holds LU's start, 73 s where 2 n^3 modelled 54 s);
        # per dropped channel (about the sparsity's share; widths vary) one read of the refit
        # (out x n) for its dot products, and the factors of its block (about 1.5 x block x n);
        # per block of ELIMINATION_BLOCK drops the refit's squared norms (three passes over it)
        # and the two downdates as matmuls, 2 n (n + out) per drop. Heads in blocks of head_dim
        # columns: heads_elimination (the start, each dropped head's downdates, the scores).
        if profile.reconstruct_reselect and lsq:
            for s in cfg.layers:
                start, per_drops, reads = mlp_elimination(s.intermediate_size, h, round(sparsity * s.intermediate_size),
                                                          layer_target=not cross)
                mlp = start + per_drops
                read_bytes += final_repairs * reads
                heads = 0
                if profile.reconstruct_reselect_heads:
                    heads = heads_elimination(s.num_attention_heads, cfg.head_dim, h,
                                              round(sparsity * s.num_attention_heads), layer_target=not cross)
                repair_flops += final_repairs * (mlp + heads)
                rank_repair_flops += final_repairs * (mlp + heads)
    if device is not None:
        dtype_name, rates = pick_compute_dtype(profile.compute_dtype, device)
        gflops = measure_matmul_gflops(DTYPES[dtype_name], seconds=measure_seconds, device=device)
    else:
        dtype_name, rates, gflops = profile.compute_dtype, {}, float("nan")
    cpu_gflops = pass_gflops = gbps = float("nan")
    repair_dtype = pick_compute_dtype(profile.reconstruct_dtype)[0] if repairing else None
    if repairing:  # the repair's own rates on the CPU: its passes', float32's, reading memory
        on_cpu = device is not None and device.type == "cpu"

        def cpu_rate(name: str) -> float:
            return gflops if on_cpu and dtype_name == name else measure_matmul_gflops(
                DTYPES[name], seconds=measure_seconds)

        cpu_gflops = cpu_rate("float32")
        pass_gflops = cpu_gflops if repair_dtype == "float32" else cpu_rate(repair_dtype)
        gbps = measure_read_gbps(seconds=min(0.3, measure_seconds)) if read_bytes else float("inf")
    eta_rounds = sum(rank_flops) / (0.8 * gflops * 1e9) / 3600
    eta_repair = ((rank_pass_flops / (pass_efficiency(repair_dtype) * pass_gflops * 1e9)
                   + rank_repair_flops / (0.8 * cpu_gflops * 1e9)
                   + read_bytes / (gbps * 1e9)) / 3600 if repairing else 0.0)
    out_bytes = (total * (1 - sparsity) + embed) * storage
    imported = (total + embed) * import_bytes  # OUT.partial/source, until the prune completes
    reselecting = profile.reconstruct_reselect and profile.reconstruct == "lsq"
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
        "disk_import_gb": imported / 1024**3,
        "disk_peak_gb": (out_bytes + imported) / 1024**3,
        "forward_tokens_per_round": tokens_per_round,
        "forward_tflops_per_round": [f / 1e12 for f in flops],
        "forward_tflops_total": (sum(flops) + repair_flops) / 1e12,
        "ranks": ranks,
        "forward_tokens_per_round_per_rank": rank_tokens_per_round,  # the busiest rank's
        "masks_per_round_per_rank": rank_masks,
        "reconstruction": {"mode": profile.reconstruct, "target": profile.reconstruct_target,
                           "reselect": reselecting, "reselect_heads": reselecting and profile.reconstruct_reselect_heads,
                           "chat_windows": profile.chat_seqs if has_chat else 0,
                           "windows": seqs,
                           "repairs": repairs if repairing else 0,
                           "final_repairs": final_repairs if repairing else 0,
                           "dtype": repair_dtype,
                           "forward_tokens": repair_tokens, "tflops": repair_flops / 1e12,
                           "reselect_read_gb": read_bytes / 1e9},
        "compute_dtype": dtype_name,
        "matmul_gflops_by_dtype": rates,
        # The executor reached 85-95% of the matmul rate on SmolLM2 in fp32 (README); ETA assumes
        # 80%, the repair's moments, solves and fp32 passes too, its bf16 / fp16 passes
        # pass_efficiency()'s two thirds (of the CPU's rate in reconstruct_dtype; measured on the
        # 13B shape, tools/results/repair_dtype_13b.json); the elimination's reads of its refit run at the
        # measured rate of reading memory. No ETA (null) for a GPU profile where
        # no GPU is visible to measure (the repair's, on the CPU, is still given).
        "eta_hours": eta_rounds + eta_repair if math.isfinite(gflops) else None,
        "eta_hours_rounds": eta_rounds if math.isfinite(gflops) else None,
        "eta_hours_repair": eta_repair,
        "matmul_gflops_measured": gflops if math.isfinite(gflops) else None,
        "repair_gflops_measured": cpu_gflops if repairing else None,  # float32 on the CPU
        "repair_pass_gflops_measured": pass_gflops if repairing else None,  # reconstruct_dtype's
        "read_gbps_measured": gbps if repairing and read_bytes else None,
    }
