"""`lowmem-bonsai prune` as one library function: calibration text in, pruned checkpoint out."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from .chat import chat_windows
from .data import load_tokenizer, tokenize_file, windows
from .engine.device import resolve_device
from .engine.memory import pick_compute_dtype
from .engine.ranks import SINGLE, RankLost, Ranks
from .errors import UserError, WriteError
from .machine import host_info, release_freed_memory
from .method.prune import Progress, PruneResult, check_reachable, check_settings, run_rounds, wave_size
from .model.checkpoint import INDEX_NAME, Checkpoint, inputs_of
from .model.config import DTYPES, ModelConfig, parse_config
from .outputs.atomic import (check_output_dir, check_output_path, make_dirs, replace_dir,
                             write_json_atomic)
from .outputs.report import build_report, plot
from .outputs.resume import RunState, run_lock
from .outputs.writer import copy_tokenizer, pruned_config, write_pruned
from .profiles import Profile
from .method.reconstruct import RepairReport, profile_repair, repairs_of
from .method.round_repair import RoundRepairs
from .model.plan import Plan
from .settings import AUTO, CalibWindows, Method, Reconstruct
from .texts import text_file
from .llamacpp.from_gguf import gguf_config, import_gguf, is_gguf_model

log = logging.getLogger(__name__)

SOURCE_NAME = "source"  # OUT.partial/source: the checkpoint imported from a GGUF given as MODEL


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


DTYPES_PART = "dtypes (compute, repair)"


def fingerprint(model_dir: Path, key: dict[str, Any], profile: Profile) -> dict[str, str]:
    """What the ranks of one prune must share, hashed by part: the source (config.json, index or
    header, shard sizes), the calibration windows and the settings (less what may differ between
    machines: memory budget, threads, prefetch, the calibration file's path), and the dtypes the
    rounds and the repair compute in (``auto`` is measured on each machine: two kinds of CPU may
    pick different ones)."""
    def sha(obj: Any) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

    sizes = {p.name: p.stat().st_size for p in sorted(Path(model_dir).glob("*.safetensors"))}
    local = {"memory_gb", "threads", "prefetch"}
    settings = {k: v for k, v in key["settings"].items() if k != "calib"}
    settings["profile"] = {k: v for k, v in settings["profile"].items() if k not in local}
    return {"source (config.json, index, shard sizes)": sha([key["source_hashes"], sizes]),
            "calibration text": key["calib_sha256"],
            "settings": sha([settings, key["wave_masks"]]),
            DTYPES_PART: ", ".join(resolved_dtypes(profile))}


def resolved_dtypes(profile: Profile) -> tuple[str, str]:
    """The rounds' compute dtype on the profile's device and the repair's on the CPU, ``auto``
    measured here ("-" where nothing is repaired)."""
    compute = pick_compute_dtype(profile.compute_dtype, resolve_device(profile.device))[0]
    repairs = profile.reconstruct != Reconstruct.NONE
    return compute, pick_compute_dtype(profile.reconstruct_dtype)[0] if repairs else "-"


def check_same_inputs(ranks: Ranks, parts: dict[str, str]) -> None:
    """Refuse, on every rank, a job whose ranks read different sources, texts or settings."""
    if ranks.world == 1:
        return
    every = ranks.gather(parts, what="the start (comparing inputs)")
    differ = [(r, [k for k in parts if theirs.get(k) != every[0].get(k)]) for r, theirs in enumerate(every)]
    differ = [(r, ks) for r, ks in differ if ks]
    if differ:
        said = "; ".join(f"rank {r}'s {' and '.join(ks)}"
                         + (f" ({every[r].get(DTYPES_PART)} against {every[0].get(DTYPES_PART)})"
                            if DTYPES_PART in ks else "") for r, ks in differ)
        pin = any(DTYPES_PART in ks for _, ks in differ)
        raise UserError(f"{said} differ{'s' if len(differ) == 1 else ''} from rank 0's: every rank must "
                        "read the same checkpoint and calibration text with the same settings (and "
                        "memory budget's wave size)" + ("; `auto` measured another fastest dtype on "
                        "those machines: set compute_dtype and reconstruct_dtype in the profile" if pin else ""))


def calibration_tokens(model_dir: Path, calib: Path | str, profile: Profile) -> torch.Tensor:
    """The prior pass's windows of seq_len tokens of the calibration text, the masks' first among
    them: the text's first windows, or spread over it (``calib_windows``).  # (S, T)"""
    return calibration_sets(model_dir, calib, profile, repair=False)[0]


def calibration_sets(model_dir: Path, calib: Path | str, profile: Profile, *,
                     repair: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The calibration windows and (``repair``, by default when the profile reconstructs) the
    reconstruction's, from one reading of the text, only as far as they need.  # (S, T), (S', T')"""
    if repair is None:
        repair = profile.reconstruct != Reconstruct.NONE
    tokenizer = load_tokenizer(model_dir)
    # a huge file is not read whole for a few windows
    ids = tokenize_file(tokenizer, calib, max_tokens=profile.tokens_read(repair))
    # the prior pass's windows; the masks use the first calib_seqs of them (run_rounds)
    if profile.calib_windows == CalibWindows.SPREAD:
        tokens = spread_windows(ids[: profile.calib_span_tokens], calib, seq_len=profile.seq_len,
                                seqs=profile.prior_windows, first=profile.calib_seqs)
    else:
        tokens = first_windows(ids, calib, seq_len=profile.seq_len, seqs=profile.prior_windows)
    repair_tokens = repair_windows(tokenizer, model_dir, ids, calib, profile) if repair else None
    return tokens, repair_tokens


def repair_windows(tokenizer: Tokenizer, model_dir: Path, ids: torch.Tensor, calib: Path | str,
                   profile: Profile) -> torch.Tensor:
    """The repair's reconstruct_seqs windows of the tokenized calibration text: the first ones as
    they are, and (``reconstruct_chat``) the text of the last share written as chat turns with the
    checkpoint's chat template (:mod:`lowmem_bonsai.chat`; plain where it has none).  # (S, T)"""
    length = profile.reconstruct_seq_len
    plain = first_windows(ids, calib, seq_len=length, seqs=profile.reconstruct_seqs)
    n = plain.shape[0]
    k = min(n, profile.chat_seqs)
    if k == 0:
        return plain
    turns = chat_windows(tokenizer, model_dir, plain[n - k:].reshape(-1), seq_len=length, seqs=k)
    if turns is None:
        return plain
    if profile.reconstruct_chat_extra:
        log.info("the repair reads %d windows of plain text and %d of the last %d's text as chat turns",
                 n, turns.shape[0], k)
        return torch.cat([plain, turns])
    log.info("the repair reads %d windows of plain text and %d of chat turns", n - k, turns.shape[0])
    return torch.cat([plain[: n - k], turns])


def first_windows(ids: torch.Tensor, calib: Path | str, *, seq_len: int, seqs: int) -> torch.Tensor:
    """The first ``seqs`` windows of ``seq_len`` tokens of the tokenized calibration text.  # (S, T)"""
    out = windows(ids, seq_len=seq_len, max_seqs=seqs, source=str(calib))
    if out.shape[0] < seqs:
        log.warning("%s gives only %d calibration windows of %d tokens (asked for %d)", calib,
                    out.shape[0], seq_len, seqs)
    return out


def spread_order(available: int, seqs: int, first: int) -> torch.Tensor:
    """Which ``seqs`` of ``available`` windows (``available >= seqs >= first``), evenly spaced over
    them, in an order whose first ``first`` are themselves evenly spaced over the text.  # (seqs,)"""
    at = torch.linspace(0, available - 1, seqs).round().long()  # distinct: the step is >= 1
    head = [round(j * seqs / first) for j in range(first)]
    picked = set(head)
    return at[torch.tensor(head + [i for i in range(seqs) if i not in picked])]


def spread_windows(ids: torch.Tensor, calib: Path | str, *, seq_len: int, seqs: int,
                   first: int) -> torch.Tensor:
    """``calib_windows = "spread"``: ``seqs`` windows of ``seq_len`` tokens evenly spaced over all of
    ``ids``, the first ``first`` of them (the masks') evenly spaced too; every window, in that
    order, when the text has no more than ``seqs``.  # (S, T)"""
    # every window of the text (the warning of first_windows where it has fewer than seqs)
    every = first_windows(ids, calib, seq_len=seq_len, seqs=max(seqs, ids.numel() // seq_len))
    seqs = min(seqs, every.shape[0])
    at = spread_order(every.shape[0], seqs, min(first, seqs))
    log.info("calibration: %d windows of %d tokens spread over the first %d of the text (the masks' are "
             "windows %s)", seqs, seq_len, every.shape[0], ", ".join(map(str, at[:first].tolist())))
    return every[at]


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


def _check_waves(state_path: Path, key: dict[str, Any]) -> None:
    """Refuse, saying why, a resume whose memory budget now plans other waves than the saved ones."""
    try:
        saved = json.loads(state_path.read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError, RecursionError):
        return  # RunState.load says what is wrong with the file
    if (isinstance(saved, dict) and saved.get("wave_masks") != key["wave_masks"]
            and {**saved, "wave_masks": key["wave_masks"]} == key):
        raise UserError(
            f"{state_path.parent}: the saved progress was scored in waves of {saved.get('wave_masks')} "
            f"masks, and this run's memory budget gives waves of {key['wave_masks']}; resume with "
            "--memory set to the budget the first run printed"
        )


def _check_resumable(out_dir: Path) -> Path:
    """The saved progress of a prune into ``out_dir``, or a UserError saying why there is none."""
    work = work_dir(out_dir)
    state_path = work / "state.json"
    if not state_path.is_file():
        if (Path(out_dir) / "plan.json").is_file():
            raise UserError(f"{out_dir}: this prune already finished; nothing to resume")
        raise UserError(f"{work}: no saved progress to resume; run without --resume")
    return state_path


def _check_beside(out_dir: Path) -> None:
    """Refuse, before any work, an ``OUT.partial`` that is not a folder or an ``OUT.lock`` that is
    not a file (a prune would fail on them half way)."""
    for path, folder, what in ((work_dir(out_dir), True, "keeps its progress in a folder"),
                               (lock_path(out_dir), False, "holds a lock file")):
        if path.is_symlink() or (path.exists() and path.is_dir() != folder):
            kind = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else "a file"
            raise UserError(f"{path}: is {kind}, where a prune into {out_dir} {what}; move it away, "
                            "or pick another --out")


def _check_fresh(out_dir: Path, *, force: bool) -> None:
    """Refuse a fresh prune over a non-empty ``out_dir`` or saved progress, unless ``force``."""
    check_output_dir(out_dir, force=force)
    work = work_dir(out_dir)
    if work.exists() and not force and _has_progress(work):
        raise UserError(
            f"{work}: a previous prune into {out_dir} stopped before finishing; add --resume to "
            "continue it, or --force to start over"
        )


def _clear_work(out_dir: Path, *, force: bool) -> None:
    """Make way for a fresh prune: refuse over saved progress unless ``force``."""
    _check_fresh(out_dir, force=force)
    work = work_dir(out_dir)
    if work.exists():
        shutil.rmtree(work)  # with --force, or nothing was scored in it: nothing is lost


def import_source(gguf: Path, out_dir: Path, *, resume: bool, force: bool) -> Path:
    """A GGUF given as MODEL, imported into ``OUT.partial/source`` (kept for --resume, removed with
    the rest of OUT.partial when the prune completes); its folder."""
    source = work_dir(out_dir) / SOURCE_NAME
    if resume:
        _check_resumable(out_dir)
        if not (source / "config.json").is_file():
            raise UserError(f"{source}: the model imported from {gguf} is gone; start over with --force")
        return source
    _clear_work(out_dir, force=force)
    log.info("importing %s into %s", gguf, source)
    try:
        import_gguf(gguf_path=gguf, out_dir=source)
    except BaseException:
        shutil.rmtree(work_dir(out_dir), ignore_errors=True)  # nothing scored: leave nothing
        raise
    return source


def _open_state(model_dir: Path, out_dir: Path, key: dict[str, Any], *, resume: bool,
                force: bool, config: ModelConfig, imported: bool = False) -> RunState:
    work = work_dir(out_dir)
    state_path = work / "state.json"
    if resume:
        _check_resumable(out_dir)
        _check_waves(state_path, key)
        return RunState.load(state_path, key=key, config=config)
    if not imported:  # import_source cleared the way already
        _clear_work(out_dir, force=force)
    make_dirs(work)
    state = RunState(state_path, key=key)
    try:
        state = RunState.create(state_path, key=key)
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
    if isinstance(exc, RankLost):
        return RankLost(f"{exc}; the progress so far is saved in {work}: run the same command with "
                        "--resume, with any number of ranks")
    if isinstance(exc, WriteError):
        return exc.again(then=f"and rerun the same command with --resume (the pruning so far is "
                              f"saved in {work})")
    return exc


def repair_plan(ckpt: Checkpoint, plan: Plan, tokens: torch.Tensor, folder: Path, profile: Profile, *,
                on_block=None, ranks: Ranks = SINGLE) -> RepairReport:
    """The profile's reconstruction of ``plan`` on ``tokens``; files in ``folder`` (by rank 0)."""
    release_freed_memory()  # what the rounds freed, before the repair's streams
    return profile_repair(ckpt, plan, tokens, folder, profile, on_block=on_block, ranks=ranks)


def write_checkpoint(source: Checkpoint, plan: Plan, stage: Path, *, model_dir: Path, profile: Profile,
                     on_block=None) -> None:
    """The pruned checkpoint (shards, config, tokenizer, plan.json) into ``stage``."""
    release_freed_memory()  # what the rounds and the repair freed
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
    memory_budget: str = "",
    ranks: Ranks = SINGLE,
) -> dict[str, Any] | None:
    """Prune ``model_dir`` and write the pruned checkpoint, plan.json, report.json and a figure.

    Progress lives in ``OUT.partial/`` until the output is complete; ``resume`` continues it.
    ``memory_budget`` says where ``profile.memory_gb`` came from (recorded in the report). With
    several ``ranks`` (torchrun), every rank calls this with the same arguments; rank 0 alone
    writes and returns the report, the others return None.
    """
    start = time.perf_counter()
    if profile.threads:
        torch.set_num_threads(profile.threads)
    out_dir = Path(out_dir)
    check_settings(sparsity=sparsity, method=method, profile=profile)
    if not 0 <= seed < 2**64:
        raise UserError(f"--seed {seed}: expected 0 to 2**64 - 1 (the random generator's range)")
    source = Path(model_dir)
    imported = is_gguf_model(source)
    if imported and ranks.world > 1:
        raise UserError(f"{source}: a distributed prune reads a checkpoint folder; import the GGUF "
                        "first (lowmem-bonsai import-gguf) where every rank can read it")
    check_output_path(out_dir, inputs=(*inputs_of(source), text_file(calib)))
    _check_beside(out_dir)
    if not resume:  # before reading the calibration text, whose warnings would come first
        _check_fresh(out_dir, force=force)
    resolve_device(profile.device)  # a GPU profile where there is no GPU: refused before any reading
    if imported:
        if not resume:  # (a resume uses the import it made)
            # a corrupt GGUF, or a target its widths leave no room for, is refused before anything is written
            check_reachable(parse_config(gguf_config(gguf_path=source), source=str(source)), sparsity, profile)
    else:
        ckpt = Checkpoint(source)
        check_reachable(ckpt.config, sparsity, profile)  # before the calibration text is read
        tokens, repair_tokens = calibration_sets(source, calib, profile)
    if ranks.world > 1:  # before rank 0 touches the output
        key = run_key(ckpt, tokens, profile, _settings(method, sparsity, seed, calib, tokens, profile))
        check_same_inputs(ranks, fingerprint(ckpt.dir, key, profile))
    if ranks.main:
        make_dirs(out_dir.parent)
    with run_lock(lock_path(out_dir), out=out_dir) if ranks.main else contextlib.nullcontext():
        if imported:  # under the lock: the import goes into OUT.partial
            model_dir = import_source(source, out_dir, resume=resume, force=force)
            try:
                ckpt = Checkpoint(model_dir)
                tokens, repair_tokens = calibration_sets(model_dir, calib, profile)
            except BaseException:
                if not resume:  # nothing scored: the import goes too
                    shutil.rmtree(work_dir(out_dir), ignore_errors=True)
                raise
        return _prune(ckpt, tokens, repair_tokens, source=source, imported=imported, out_dir=out_dir,
                      sparsity=sparsity, profile=profile, calib=calib, method=method, seed=seed,
                      force=force, resume=resume, progress=progress, memory_budget=memory_budget,
                      start=start, ranks=ranks)


def _settings(method: str, sparsity: float, seed: int, calib: Path | str, tokens: torch.Tensor,
              profile: Profile) -> dict[str, Any]:
    return {"method": method, "sparsity": sparsity, "seed": seed, "calib": str(calib),
            "calib_seqs": int(min(tokens.shape[0], profile.calib_seqs)), "prior_seqs": int(tokens.shape[0]),
            "profile": {k: getattr(profile, k) for k in profile.__dataclass_fields__}}


def run_key(ckpt: Checkpoint, tokens: torch.Tensor, profile: Profile, settings: dict[str, Any]) -> dict[str, Any]:
    """What saved progress depends on: a resume must match it."""
    # The budget may come from what the machine has free, which differs between a run and its
    # resume; what the saved progress depends on is the wave size it bought. How long ranks wait
    # for each other changes nothing computed.
    return {"source_hashes": source_hashes(ckpt.dir),
            "settings": {**settings, "profile": {k: v for k, v in settings["profile"].items()
                                                 if k not in ("memory_gb", "dist_timeout_s")}},
            "wave_masks": wave_size(ckpt.config, tokens, profile, resolve_device(profile.device)),
            "calib_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()}


def _open_shared_state(ranks: Ranks, key: dict[str, Any], open_state) -> RunState:
    """Rank 0 opens the progress (``open_state()``) and sends it to the other ranks, which follow
    it in a copy that writes nothing; a refusal on rank 0 stops every rank."""
    if ranks.world == 1:
        return open_state()
    if ranks.main:
        try:
            state = open_state()
        except UserError as exc:
            ranks.broadcast(("refused", str(exc)), what="the start (opening the progress)")
            raise
        ranks.broadcast(("ok", state.data), what="the start (opening the progress)")
        return state
    status, payload = ranks.broadcast(None, what="the start (opening the progress)")
    if status != "ok":
        raise UserError(f"rank 0 refused to start: {payload}")
    return RunState.mirror(payload, key=key)


def _prune(ckpt: Checkpoint, tokens: torch.Tensor, repair_tokens: torch.Tensor | None, *,
           source: Path, imported: bool, out_dir: Path, sparsity: float, profile: Profile,
           calib: Path | str, method: str, seed: int, force: bool, resume: bool,
           progress: Progress | None, memory_budget: str, start: float,
           ranks: Ranks = SINGLE) -> dict[str, Any] | None:
    """The prune itself, with the inputs checked and the output locked (by rank 0)."""
    model_dir = ckpt.dir
    try:
        settings = _settings(method, sparsity, seed, calib, tokens, profile)
        key = run_key(ckpt, tokens, profile, settings)
        hashes = key["source_hashes"]
        state = _open_shared_state(ranks, key, lambda: _open_state(
            model_dir, out_dir, key, resume=resume, force=force, config=ckpt.config, imported=imported))
    except BaseException:
        if imported and not resume:  # nothing scored: the import goes too
            shutil.rmtree(work_dir(out_dir), ignore_errors=True)
        raise
    if memory_budget:
        settings["memory_budget"] = memory_budget
        log.info("%s", memory_budget)
    if imported:
        settings["imported_from"] = str(source)
    between = None  # reconstruct_in_rounds: the repair before every round after the first
    if profile.reconstruct_in_rounds:
        between = RoundRepairs(ckpt, repair_tokens, work=work_dir(out_dir), profile=profile, ranks=ranks,
                               progress=progress)
    if not ranks.main:  # the others score their share of the rounds; rank 0 writes everything
        try:
            result = run_rounds(ckpt, tokens, sparsity=sparsity, profile=profile, method=method, seed=seed,
                                progress=progress, state=state, ranks=ranks, repair=between)
        finally:
            if between is not None:
                between.close()  # its temporary folder
        if repair_tokens is not None:  # its share of the reconstruction's windows; rank 0 writes
            repair_plan(ckpt, result.plan, repair_tokens, work_dir(out_dir) / "repair", profile, ranks=ranks)
        log.info("rank %d: %d forward tokens; rank 0 writes %s", ranks.rank, result.rank_tokens[ranks.rank],
                 out_dir)
        return None
    stage = work_dir(out_dir) / "out"
    try:
        result: PruneResult = run_rounds(ckpt, tokens, sparsity=sparsity, profile=profile,
                                         method=method, seed=seed, progress=progress, state=state,
                                         ranks=ranks, repair=between)
        if between is not None:
            between.close()  # the final repair starts again from the source
        plan = result.plan
        # plan.json says how the plan was made, not what this machine had free while it ran
        # (report.json keeps the budget): a resumed run writes the same bytes.
        plan.meta.update({"method": method, "settings": {k: v for k, v in settings.items()
                                                         if k != "memory_budget"},
                          "source": str(source), "source_hashes": hashes})
        n_layers = ckpt.config.num_hidden_layers
        weights, repair = ckpt, None  # the source, or the source with its repaired tensors
        if repair_tokens is not None:  # refit from the source (ckpt), never from a round's repair
            t0 = time.perf_counter()
            steps = repairs_of(profile) * n_layers  # every repair's layers
            on_repair = (lambda l: progress("repair", l + 1, steps)) if progress else None
            repair = repair_plan(ckpt, plan, repair_tokens, work_dir(out_dir) / "repair", profile,
                                 on_block=on_repair, ranks=ranks)
            weights, plan = ckpt.with_overlay(repair.files), repair.plan  # (reselect: its channels)
            repair_seconds = time.perf_counter() - t0
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        on_write = (lambda l: progress("write", l + 1, n_layers)) if progress else None
        write_checkpoint(weights, plan, stage, model_dir=model_dir, profile=profile, on_block=on_write)
        report = build_report(ckpt.config, result, settings=settings,
                              seconds=time.perf_counter() - start)
        report["ranks"] = ranks.world
        report["compute_dtype"] = resolved_dtypes(profile)[0]  # the rounds' (``auto`` as resolved here)
        report["forward_tokens_per_rank"] = list(result.rank_tokens)  # this run's (not resumed work)
        report["host"] = host_info()  # rank 0's machine: bf16 rounds may choose otherwise on another CPU
        if repair is not None:
            report["reconstruction"] = {
                "mode": repair.mode, "sequential": repair.sequential, "tokens": repair.tokens,
                "target": repair.target, "dtype": repair.block_dtype, "forward_tokens": repair.forward_tokens,
                "repairs": repair.repairs, "gap_weight": profile.reconstruct_gap_weight,
                "seconds": repair_seconds, "layers": repair.layers}
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
