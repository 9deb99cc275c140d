"""`lowmem-bonsai prune` as one library function: calibration text in, pruned checkpoint out."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .data import load_tokenizer, tokenize_file, windows
from .engine.device import resolve_device
from .errors import UserError, WriteError
from .method.prune import Progress, PruneResult, check_settings, run_rounds
from .model.checkpoint import INDEX_NAME, Checkpoint
from .model.config import DTYPES
from .outputs.atomic import check_output_dir, commit_dir, write_json_atomic
from .outputs.report import build_report, plot
from .outputs.resume import RunState
from .outputs.writer import copy_tokenizer, pruned_config, write_pruned
from .profiles import Profile
from .method.reconstruct import RepairReport, reconstruct
from .model.plan import Plan
from .settings import AUTO, Method

log = logging.getLogger(__name__)


def source_hashes(model_dir: Path) -> dict[str, str]:
    """sha256 of the source config.json and of its index (or single shard's header)."""
    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    model_dir = Path(model_dir)
    out = {"config.json": sha((model_dir / "config.json").read_bytes())}
    index = model_dir / INDEX_NAME
    if index.is_file():
        out[INDEX_NAME] = sha(index.read_bytes())
    else:
        with open(model_dir / "model.safetensors", "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            out["model.safetensors:header"] = sha(f.read(n))
    return out


def calibration_tokens(ids: torch.Tensor, calib: Path, *, seq_len: int, seqs: int) -> torch.Tensor:
    """The first ``seqs`` windows of ``seq_len`` tokens of the tokenized calibration text.  # (S, T)"""
    out = windows(ids, seq_len=seq_len, max_seqs=seqs, source=str(calib))
    if out.shape[0] < seqs:
        log.warning("%s gives only %d calibration windows of %d tokens (asked for %d)", calib,
                    out.shape[0], seq_len, seqs)
    return out


def work_dir(out_dir: Path) -> Path:
    """Where a prune keeps its progress and builds its output until it is complete."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}.partial")


def _open_state(model_dir: Path, out_dir: Path, key: dict[str, Any], *, resume: bool,
                force: bool) -> RunState:
    work = work_dir(out_dir)
    state_path = work / "state.json"
    if resume:
        if not state_path.is_file():
            if (Path(out_dir) / "plan.json").is_file():
                raise UserError(f"{out_dir}: this prune already finished; nothing to resume")
            raise UserError(f"{work}: no saved progress to resume; run without --resume")
        return RunState.load(state_path, key=key)
    check_output_dir(out_dir, force=force)
    if work.exists():
        if not force:
            raise UserError(
                f"{work}: a previous prune into {out_dir} stopped before finishing; add --resume to "
                "continue it, or --force to start over"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        state = RunState.create(state_path, key=key)
    except WriteError:
        shutil.rmtree(work)  # else a rerun would be told to resume a run that has no progress
        raise
    return state


def _failed(exc: UserError, state: RunState, out_dir: Path) -> UserError:
    """Clean up after a prune stopped by ``exc``: keep its saved progress, or leave nothing."""
    work = work_dir(out_dir)
    if not state.has_progress:
        shutil.rmtree(work, ignore_errors=True)  # nothing scored yet: a plain rerun loses nothing
        return exc
    shutil.rmtree(work / "out", ignore_errors=True)  # the part of the output written so far
    if isinstance(exc, WriteError):
        return exc.again(then=f"and rerun the same command with --resume (the pruning so far is "
                              f"saved in {work})")
    return exc


def repair_plan(ckpt: Checkpoint, plan: Plan, tokens: torch.Tensor, folder: Path, profile: Profile, *,
                on_block=None) -> RepairReport:
    """The profile's reconstruction of ``plan`` on ``tokens``; files in ``folder``."""
    return reconstruct(ckpt, plan, tokens, folder, mode=profile.reconstruct,
                       ridge=profile.reconstruct_ridge, sequential=profile.reconstruct_sequential,
                       dtype=torch.float32, chunk_tokens=profile.chunk_tokens,
                       prefetch=profile.prefetch, on_block=on_block)


def write_checkpoint(source: Checkpoint, plan: Plan, stage: Path, *, model_dir: Path, profile: Profile,
                     on_block=None) -> None:
    """The pruned checkpoint (shards, config, tokenizer, plan.json) into ``stage``."""
    storage = None if profile.storage_dtype == AUTO else DTYPES[profile.storage_dtype]
    write_pruned(source, plan, stage, dtype=storage, on_block=on_block)
    write_json_atomic(stage / "config.json", pruned_config(source, plan))
    copy_tokenizer(model_dir, stage)
    write_json_atomic(stage / "plan.json", plan.to_json())


def prune_model(
    *,
    model_dir: Path,
    out_dir: Path,
    sparsity: float,
    profile: Profile,
    calib: Path,
    method: str = Method.BONSAI,
    seed: int = 0,
    force: bool = False,
    resume: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Prune ``model_dir`` and write the pruned checkpoint, plan.json, report.json and a figure.

    Progress lives in ``OUT.partial/`` until the output is complete; ``resume`` continues it.
    """
    start = time.perf_counter()
    if profile.threads:
        torch.set_num_threads(profile.threads)
    out_dir = Path(out_dir)
    check_settings(sparsity=sparsity, method=method)
    resolve_device(profile.device)  # a GPU profile where there is no GPU: refused before any reading
    ckpt = Checkpoint(model_dir)
    ids = tokenize_file(load_tokenizer(model_dir), calib)
    tokens = calibration_tokens(ids, calib, seq_len=profile.seq_len, seqs=profile.calib_seqs)
    repair_tokens = None
    if profile.reconstruct != "none":
        repair_tokens = calibration_tokens(ids, calib, seq_len=profile.reconstruct_seq_len,
                                           seqs=profile.reconstruct_seqs)
    settings = {
        "method": method, "sparsity": sparsity, "seed": seed, "calib": str(calib),
        "calib_seqs": int(tokens.shape[0]), "profile": {
            k: getattr(profile, k) for k in profile.__dataclass_fields__},
    }
    hashes = source_hashes(model_dir)
    key = {"source_hashes": hashes, "settings": settings,
           "calib_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()}
    state = _open_state(model_dir, out_dir, key, resume=resume, force=force)
    stage = work_dir(out_dir) / "out"
    try:
        result: PruneResult = run_rounds(ckpt, tokens, sparsity=sparsity, profile=profile,
                                         method=method, seed=seed, progress=progress, state=state)
        plan = result.plan
        plan.meta.update({"method": method, "settings": settings, "source": str(model_dir),
                          "source_hashes": hashes})
        n_layers = ckpt.config.num_hidden_layers
        source, repair = ckpt, None
        if repair_tokens is not None:
            t0 = time.perf_counter()
            on_repair = (lambda l: progress("repair", l + 1, n_layers)) if progress else None
            repair = repair_plan(ckpt, plan, repair_tokens, work_dir(out_dir) / "repair", profile,
                                 on_block=on_repair)
            source = ckpt.with_overlay(repair.files)
            repair_seconds = time.perf_counter() - t0
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        on_write = (lambda l: progress("write", l + 1, n_layers)) if progress else None
        write_checkpoint(source, plan, stage, model_dir=model_dir, profile=profile, on_block=on_write)
        report = build_report(ckpt.config, result, settings=settings,
                              seconds=time.perf_counter() - start)
        if repair is not None:
            report["reconstruction"] = {
                "mode": repair.mode, "sequential": repair.sequential, "tokens": repair.tokens,
                "forward_tokens": 2 * repair.tokens, "seconds": repair_seconds, "layers": repair.layers}
        write_json_atomic(stage / "report.json", report)
        plot(ckpt.config, plan, report, stage / "pruning.png")
    except UserError as exc:
        raise _failed(exc, state, out_dir) from None
    # Only a complete output gets the final name; then the progress is no longer needed.
    commit_dir(stage, out_dir)
    shutil.rmtree(work_dir(out_dir))
    log.info("pruned %s -> %s: sparsity %.4f", model_dir, out_dir, report["achieved_sparsity"])
    return report
