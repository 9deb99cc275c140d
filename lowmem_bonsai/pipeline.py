"""`lowmem-bonsai prune` as one library function: calibration text in, pruned checkpoint out."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import INDEX_NAME, Checkpoint
from .data import load_tokenizer, tokenize_file, windows
from .device import resolve_device
from .errors import UserError, WriteError
from .outputs import (check_output_dir, check_output_path, make_dirs, replace_dir,
                      write_json_atomic)
from .profiles import Profile
from .config import DTYPES, ModelConfig
from .prune import Progress, PruneResult, check_settings, run_rounds
from .report import build_report, plot
from .resume import RunState, run_lock
from .writer import copy_tokenizer, pruned_config, write_pruned

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


def calibration_tokens(model_dir: Path, calib: Path, profile: Profile) -> torch.Tensor:
    """The first calib_seqs windows of seq_len tokens of the calibration text.  # (S, T)"""
    need = profile.calib_seqs * profile.seq_len  # a huge file is not read whole for a few windows
    ids = tokenize_file(load_tokenizer(model_dir), calib, max_tokens=need)
    seqs = windows(ids, seq_len=profile.seq_len, max_seqs=profile.calib_seqs, source=str(calib))
    if seqs.shape[0] < profile.calib_seqs:
        log.warning("%s gives only %d calibration windows of %d tokens (asked for %d)", calib,
                    seqs.shape[0], profile.seq_len, profile.calib_seqs)
    return seqs


def work_dir(out_dir: Path) -> Path:
    """Where a prune keeps its progress and builds its output until it is complete."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}.partial")


def lock_path(out_dir: Path) -> Path:
    """The lock naming the prune that writes ``out_dir`` (beside it, like the work folder)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}.lock")


def _has_progress(work: Path) -> bool:
    """Whether ``work`` holds scored rounds or waves (a folder without them loses nothing)."""
    try:
        data = json.loads((work / "state.json").read_text(encoding="utf-8"))
        return bool(data.get("rounds") or data.get("waves"))
    except (OSError, ValueError, RecursionError, AttributeError):
        return (work / "state.json").exists()  # unreadable: kept for the user to look at


def _open_state(model_dir: Path, out_dir: Path, key: dict[str, Any], *, resume: bool,
                force: bool, config: ModelConfig) -> RunState:
    work = work_dir(out_dir)
    state_path = work / "state.json"
    if resume:
        if not state_path.is_file():
            if (Path(out_dir) / "plan.json").is_file():
                raise UserError(f"{out_dir}: this prune already finished; nothing to resume")
            raise UserError(f"{work}: no saved progress to resume; run without --resume")
        return RunState.load(state_path, key=key, config=config)
    check_output_dir(out_dir, force=force)
    if work.exists():
        if not force and _has_progress(work):
            raise UserError(
                f"{work}: a previous prune into {out_dir} stopped before finishing; add --resume to "
                "continue it, or --force to start over"
            )
        shutil.rmtree(work)  # with --force, or nothing was scored in it: nothing is lost
    make_dirs(work)
    state = RunState(state_path, key=key)
    try:
        state._save()
    except WriteError:
        shutil.rmtree(work)  # else a rerun would be told to resume a run that has no progress
        raise
    return state


def _failed(exc: UserError | None, state: RunState, out_dir: Path) -> UserError | None:
    """Clean up after a prune stopped by ``exc`` (None: not a UserError): keep its saved progress,
    or leave nothing."""
    work = work_dir(out_dir)
    if not state.has_progress:
        shutil.rmtree(work, ignore_errors=True)  # nothing scored yet: a plain rerun loses nothing
        return exc
    shutil.rmtree(work / "out", ignore_errors=True)  # the part of the output written so far
    if isinstance(exc, WriteError):
        return exc.again(then=f"and rerun the same command with --resume (the pruning so far is "
                              f"saved in {work})")
    return exc


def prune_model(
    *,
    model_dir: Path,
    out_dir: Path,
    sparsity: float,
    profile: Profile,
    calib: Path,
    method: str = "bonsai",
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
    if not 0 <= seed < 2**64:
        raise UserError(f"--seed {seed}: expected 0 to 2**64 - 1 (the random generator's range)")
    check_output_path(out_dir, inputs=(Path(model_dir), Path(calib)))
    resolve_device(profile.device)  # a GPU profile where there is no GPU: refused before any reading
    ckpt = Checkpoint(model_dir)
    tokens = calibration_tokens(model_dir, calib, profile)
    make_dirs(out_dir.parent)
    with run_lock(lock_path(out_dir), out=out_dir):
        return _prune(ckpt, tokens, out_dir=out_dir, sparsity=sparsity, profile=profile, calib=calib,
                      method=method, seed=seed, force=force, resume=resume, progress=progress,
                      start=start)


def _prune(ckpt: Checkpoint, tokens: torch.Tensor, *, out_dir: Path, sparsity: float,
           profile: Profile, calib: Path, method: str, seed: int, force: bool, resume: bool,
           progress: Progress | None, start: float) -> dict[str, Any]:
    """The prune itself, with the inputs checked and the output locked."""
    model_dir = ckpt.dir
    settings = {
        "method": method, "sparsity": sparsity, "seed": seed, "calib": str(calib),
        "calib_seqs": int(tokens.shape[0]), "profile": {
            k: getattr(profile, k) for k in profile.__dataclass_fields__},
    }
    hashes = source_hashes(model_dir)
    key = {"source_hashes": hashes, "settings": settings,
           "calib_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()}
    state = _open_state(model_dir, out_dir, key, resume=resume, force=force, config=ckpt.config)
    stage = work_dir(out_dir) / "out"
    try:
        result: PruneResult = run_rounds(ckpt, tokens, sparsity=sparsity, profile=profile,
                                         method=method, seed=seed, progress=progress, state=state)
        plan = result.plan
        plan.meta.update({"method": method, "settings": settings, "source": str(model_dir),
                          "source_hashes": hashes})
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        storage = None if profile.storage_dtype == "auto" else DTYPES[profile.storage_dtype]
        n_layers = ckpt.config.num_hidden_layers
        on_write = (lambda l: progress("write", l + 1, n_layers)) if progress else None
        write_pruned(ckpt, plan, stage, dtype=storage, on_block=on_write)
        write_json_atomic(stage / "config.json", pruned_config(ckpt, plan))
        copy_tokenizer(model_dir, stage)
        write_json_atomic(stage / "plan.json", plan.to_json())
        report = build_report(ckpt.config, result, settings=settings,
                              seconds=time.perf_counter() - start)
        write_json_atomic(stage / "report.json", report)
        plot(ckpt.config, plan, report, stage / "pruning.png")
        # Only a complete output gets the final name; then the progress is no longer needed.
        replace_dir(stage, out_dir)
    except UserError as exc:
        raise _failed(exc, state, out_dir) from None
    except BaseException:  # Ctrl-C, SIGTERM or a bug: keep what was scored, else leave nothing
        _failed(None, state, out_dir)
        raise
    shutil.rmtree(work_dir(out_dir), ignore_errors=True)
    log.info("pruned %s -> %s: sparsity %.4f", model_dir, out_dir, report["achieved_sparsity"])
    return report
