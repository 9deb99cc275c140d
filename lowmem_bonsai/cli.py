"""The command line: thin wrappers that parse flags and call one library function each."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from typer.core import TyperGroup

from .errors import Terminated, UserError
from .machine import memory_budget, parse_memory
from .model.config import DTYPES
from .profiles import DEFAULT_PROFILE, Profile, load_profile, profile_names
from .settings import (Allocation, CalibWindows, DType, Estimator, HeadUnit, MaskCounts, Method, Prior,
                       RepairTarget, Score, one_of)
from .texts import DEFAULT_CALIB, names_help, text_file

PROFILE_HELP = (f"Profile: one of {', '.join(profile_names())} (default {DEFAULT_PROFILE}), "
                "or the path of a .toml file.")

_state = {"debug": False}


# Click's errors, from whichever Click this Typer uses (its own copy since Typer 0.20)
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_NO_ARGS = getattr(sys.modules[_USAGE_ERROR.__module__], "NoArgsIsHelpError", ())  # Click >= 8.2


class _Commands(TyperGroup):
    """The app's commands. Every error a user can fix is caught here, once, for all of them: one
    line ``error: ...`` on stderr and exit status 2 (with --debug, the traceback instead)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """A bad option or argument (``--seq-len abc``, a missing ``--data``, an unknown command)
        is one line too, naming the --help to read, instead of Click's usage box."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS:  # no arguments at all: the help, as before
            return super().main(args, prog_name, complete_var, standalone_mode=True, **extra)
        except _USAGE_ERROR as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "lowmem-bonsai"
            typer.echo(f"error: {exc.format_message()} (see {where} --help)", err=True)
            sys.exit(exc.exit_code)
        except _CLICK_ERROR as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if _state["debug"]:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated, a KeyboardInterrupt)
            terminated = isinstance(exc, Terminated)
            typer.echo("terminated" if terminated else "interrupted", err=True)
            for note in getattr(exc, "__notes__", ()):  # what the command adds, e.g. how to resume
                typer.echo(note, err=True)
            raise typer.Exit(Terminated.exit_code if terminated else 130) from None


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    help="Structured pruning of LLMs with forward passes only (Bonsai), streamed from disk, "
    "for machines with less memory than the model.",
)

MEMORY_HELP = ("Memory this run may use, e.g. 6G, 6GB, 6144M or 6.5G (binary: 1G = 2^30 bytes). "
               "Default: {what}95 % of what this machine or its container has "
               "(available memory; cgroup v1/v2 memory limit).")



def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"dtype '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _repair_tokens(report: dict) -> str:
    """ and the final repair's forward tokens, where the prune repaired what is left"""
    repair = report.get("reconstruction")
    return f" (+{repair['forward_tokens']:,} in the repair)" if repair else ""


def _budgeted(prof: Profile, memory: str | None):
    """The profile with memory_gb set to the budget this run plans for, and that budget."""
    budget = memory_budget(profile_gb=prof.memory_gb, profile_name=prof.name, memory=memory)
    return prof.replace(memory_gb=budget.gb), budget


def _explained(fn, budget):
    """``fn``, whose refusal of the memory budget also says where that budget came from."""
    def call(**kwargs):
        try:
            return fn(**kwargs)
        except UserError as exc:
            if budget.source in ("flag", "profile") or "memory budget" not in str(exc):
                raise
            raise UserError(f"{exc} (the budget is {budget.reason})") from None
    return call


def _terminate(signum, frame) -> None:
    raise Terminated()


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: expected at least 1")


@app.callback()
def main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    _state["debug"] = debug
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)  # clean up as Ctrl-C does
        ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))  # for in-process callers
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


@app.command("import-gguf")
def import_gguf_cmd(
    gguf_file: Annotated[Path, typer.Argument(help="A llama.cpp GGUF of a Llama-family model.")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint folder to create.")],
    dtype: Annotated[str, typer.Option(help=f"Storage dtype: {one_of(DType)}.")] = DType.FLOAT16,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
) -> None:
    """Turn a GGUF into a Hugging Face checkpoint (config.json, safetensors, tokenizer.json).

    Tensors are dequantized one at a time and llama.cpp's q/k row order is undone, so memory stays
    near the size of the largest tensor.
    """
    from .llamacpp.from_gguf import import_gguf

    path = import_gguf(gguf_path=gguf_file, out_dir=out, dtype=dtype, force=force)
    typer.echo(f"wrote {path}")


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Argument(
        help="Checkpoint folder (config.json + safetensors), or a .gguf file (run by llama.cpp).")],
    data: Annotated[Path, typer.Option("--data", help=(
        "UTF-8 text file to measure perplexity on, or a text shipped with the package: "
        f"{names_help()}."))],
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    max_seqs: Annotated[Optional[int], typer.Option(help="Use only the first N windows.")] = None,
    skip: Annotated[int, typer.Option(help="Skip the first N windows (e.g. used for calibration).")] = 0,
    batch_seqs: Annotated[int, typer.Option(help="Windows per streamed pass over the blocks.")] = 8,
    dtype: Annotated[str, typer.Option(help=f"Compute dtype: {one_of(DType)}.")] = DType.FLOAT32,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's).")] = None,
    device: Annotated[str, typer.Option(help="Where a checkpoint's blocks compute: cpu, cuda or cuda:N.")] = "cpu",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON.")] = None,
    memory: Annotated[Optional[str], typer.Option(
        help=MEMORY_HELP.format(what="") + " Fewer windows go through a pass when "
        "--batch-seqs would not fit. Checkpoints only: llama.cpp sizes a .gguf itself.")] = None,
) -> None:
    """Perplexity: the whole file tokenized once (no BOS), cut into non-overlapping windows of
    --seq-len tokens (the last partial one dropped), exp(mean next-token NLL) over all of them."""
    from tqdm import tqdm

    from .evaluate import evaluate
    from .model.checkpoint import inputs_of
    from .outputs.atomic import check_output_path, make_dirs, write_json_atomic

    _check_threads(threads)
    if json_out is not None:  # refused before the evaluation, not after it
        check_output_path(json_out, flag="--json", folder=False,
                          inputs=(*inputs_of(model), text_file(data)))
        make_dirs(json_out.parent)
    if threads:
        torch.set_num_threads(threads)
    bar = tqdm(desc="eval", unit="seq", disable=None)

    def on_batch(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    if model.suffix == ".gguf" and not model.is_dir():  # llama.cpp tokenizes and runs it
        from .llamacpp.runner import gguf_perplexity

        if memory is not None:
            parse_memory(memory)  # a bad value is still refused

        result = gguf_perplexity(gguf=model, data=data, seq_len=seq_len, max_seqs=max_seqs,
                                 skip=skip, threads=threads, on_batch=on_batch)
    else:
        budget = memory_budget(profile_gb=None, memory=memory)
        logging.getLogger(__name__).info("%s", budget.line())
        result = evaluate(model_dir=model, data=data, seq_len=seq_len, max_seqs=max_seqs,
                          skip=skip, batch_seqs=batch_seqs, dtype=_dtype(dtype), device=device,
                          on_batch=on_batch, memory_gb=budget.gb)
    bar.close()
    typer.echo(f"perplexity {result.perplexity:.4f}  ({result.tokens} tokens, {result.sequences} x "
               f"{result.seq_len}, {result.seconds:.1f} s)")
    if json_out is not None:
        write_json_atomic(json_out, result.to_json())


@app.command("estimate")
def estimate_cmd(
    model: Annotated[Path, typer.Argument(
        help="Checkpoint folder to prune, or a .gguf (estimated from its metadata, as prune would import it).")],
    profile: Annotated[Optional[str], typer.Option(help=PROFILE_HELP)] = None,
    sparsity: Annotated[float, typer.Option(help="Target sparsity.")] = 0.5,
    method: Annotated[str, typer.Option(
        help=f"{one_of(Method, helped=True)}; all but bonsai are baselines without masks.")] = Method.BONSAI,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    memory: Annotated[Optional[str], typer.Option(
        help=MEMORY_HELP.format(what="the smaller of the profile's memory_gb and "))] = None,
    ranks: Annotated[int, typer.Option(
        help="Ranks of a distributed prune (torchrun), each a machine like this one: the ETA "
        "divides the waves and windows among them.")] = 1,
) -> None:
    """Before any work: peak memory by component, disk needed, forward FLOPs per round and an ETA
    from a matmul rate measured on this machine in about a second."""
    from .estimate import estimate

    prof, budget = _budgeted(load_profile(profile), memory)
    e = _explained(estimate, budget)(model_dir=model, profile=prof, sparsity=sparsity, method=method,
                                     ranks=ranks)
    e["memory_budget"] = {"gb": budget.gb, "source": budget.source, "reason": budget.reason}
    if as_json:
        typer.echo(json.dumps(e, indent=2))
        return
    m = e["memory"]
    typer.echo(f"model      {e['params_total'] / 1e9:.2f} B params ({e['params_blocks'] / 1e9:.2f} B in blocks)")
    typer.echo(f"profile    {e['profile']}: compute {e['compute_dtype']} on {e['device']}")
    typer.echo(f"budget     {budget.line()}")
    parts = ["resident_blocks", "hidden_store", "activations", "head", "runtime", "total"]
    if m["device"] == "cpu":
        typer.echo("memory     " + ", ".join(f"{k.replace('_', ' ')} {m[k + '_gb']:.2f}" for k in parts) + " GiB")
    else:
        typer.echo(f"host       blocks being loaded {m['resident_blocks_gb']:.2f}, runtime {m['runtime_gb']:.2f}, "
                   f"total {m['total_gb']:.2f} GiB")
        typer.echo(f"device     block {m['device_block_gb']:.2f}, hidden store {m['hidden_store_gb']:.2f}, "
                   f"activations {m['activations_gb']:.2f}, head {m['head_gb']:.2f}, total "
                   f"{m['device_total_gb']:.2f} of {m['device_budget_gb']:.1f} GiB")
    typer.echo(f"waves      {m['waves']} x {m['wave_masks']} masks per round")
    if e["ranks"] > 1:
        typer.echo(f"ranks      {e['ranks']}: at most {e['masks_per_round_per_rank']} masks and "
                   f"{e['forward_tokens_per_round_per_rank']:,} forward tokens per round on each "
                   "(and its share of the reconstruction's windows; rank 0 writes)")
    typer.echo(f"writing    one tensor at a time, peak {m['write_gb']:.2f} GiB (after the rounds; counted in the total)")
    r = e["reconstruction"]
    if r["mode"] != "none":
        final = r["final_repairs"]
        after = ("after the rounds" if final == 1 else
                 "after the rounds twice, the second weighing each token by the first's losses")
        between = r["repairs"] - final
        when = after if between == 0 else f"{r['repairs']} repairs: before every round after the first, and {after}"
        target = "" if r.get("target", "layer") == "layer" else f" (target {r['target']})"
        target += (", reselecting MLP channels and heads" if r.get("reselect_heads") else
                   ", reselecting MLP channels" if r.get("reselect") else "")
        if r.get("chat_windows"):
            target += f", {r['chat_windows']} of {r['windows']} windows as chat turns"
        typer.echo(f"repair     {r['mode']}{target}: {r['forward_tokens']:,} forward tokens, {r['tflops']:.1f} TFLOP, "
                   f"peak {m['reconstruction_gb']:.2f} GiB ({when}; counted in the total)")
    if e["disk_import_gb"]:
        typer.echo(f"disk       {e['disk_peak_gb']:.2f} GiB at the peak: {e['disk_import_gb']:.2f} for the GGUF's "
                   f"import (OUT.partial/source, removed at the end) + {e['disk_output_gb']:.2f} for the pruned model")
    else:
        typer.echo(f"disk       {e['disk_output_gb']:.2f} GiB for the pruned model")
    typer.echo(f"compute    {e['rounds']} round{'' if e['rounds'] == 1 else 's'}, "
               f"{e['forward_tokens_per_round']:,} forward tokens and "
               f"{e['forward_tflops_per_round'][0]:.1f} TFLOP in the first; {e['forward_tflops_total']:.1f} TFLOP in all")
    repair_rates = ""
    if e["repair_gflops_measured"] is not None:  # the repair's own, on the CPU: its passes', float32's
        repair_rates = f"{e['repair_gflops_measured']:.0f} GFLOP/s float32"
        if r["dtype"] != "float32":
            repair_rates = f"{e['repair_pass_gflops_measured']:.0f} GFLOP/s {r['dtype']} passes, " + repair_rates
    if e["eta_hours"] is None:
        typer.echo(f"speed      no {e['device']} device visible here to measure: no ETA"
                   + (f" (the repair runs on this CPU: {e['eta_hours_repair']:.2f} h at {repair_rates})"
                      if r["mode"] != "none" else ""))
        return
    speed = (f"speed      {e['matmul_gflops_measured']:.0f} GFLOP/s measured {e['compute_dtype']} matmul rate "
             f"on {e['device']}")
    if repair_rates:
        speed += f"; the repair: {repair_rates} on cpu"
        if e["read_gbps_measured"] is not None:
            speed += f", {e['read_gbps_measured']:.0f} GB/s reading memory ({r['reselect_read_gb']:,.0f} GB to read)"
    typer.echo(speed)
    typer.echo(f"ETA        {e['eta_hours']:.2f} h" + (f" with {e['ranks']} ranks" if e["ranks"] > 1 else "")
               + (f": the rounds {e['eta_hours_rounds']:.2f} h, the repair {e['eta_hours_repair']:.2f} h"
                  if r["mode"] != "none" else ""))


class _Bars:
    """tqdm bars, one per stage, fed by the library's progress callback."""

    LABELS = {"round": "rounds", "prior": "prior pass (blocks)", "masks": "masked passes (blocks)",
              "repair": "reconstruction (blocks)", "write": "writing shards (blocks)"}

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None or done < bar.n:
            if bar is not None:
                bar.close()
            bar = self._tqdm(total=total, desc=self.LABELS.get(stage, stage), leave=stage == "round",
                             position=0 if stage == "round" else 1, disable=None, dynamic_ncols=True)
            self.bars[stage] = bar
        bar.total = total
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


@app.command("prune")
def prune_cmd(
    model: Annotated[Path, typer.Argument(
        help="Checkpoint folder to prune (config.json + safetensors), or a Llama-family .gguf: imported "
        "into OUT.partial/source first (removed when the prune completes).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the pruned checkpoint.")],
    calib: Annotated[Path, typer.Option(
        help="Calibration text (UTF-8 file, or a text shipped with the package: "
        f"{names_help()}); windows of seq_len tokens from its start (--calib-windows says which).")] = Path(DEFAULT_CALIB),
    sparsity: Annotated[float, typer.Option(help="Fraction of non-embedding parameters to remove.")] = 0.5,
    profile: Annotated[Optional[str], typer.Option(
        help=PROFILE_HELP)] = None,
    method: Annotated[str, typer.Option(help=f"{one_of(Method, helped=True)}.")] = Method.BONSAI,
    seed: Annotated[int, typer.Option(help="Seed for mask sampling and the random baseline.")] = 0,
    reconstruct: Annotated[Optional[str], typer.Option(
        help="Override the profile: repair what is left after the units are chosen: none, bias (the "
        "removed inputs' mean, as FLAP) or lsq (least-squares refit of o_proj/down_proj and a bias "
        "from calibration activations; the profile's reconstruct_reselect, lsq only, then also chooses the "
        "MLP channels each layer keeps, and with reconstruct_reselect_heads its heads).")] = None,
    reconstruct_seqs: Annotated[Optional[int], typer.Option(
        help="Override the profile: calibration windows (of reconstruct_seq_len tokens) for the repair.")] = None,
    reconstruct_target: Annotated[Optional[str], typer.Option(
        help=f"Override the profile: what the repair reproduces: {one_of(RepairTarget, helped=True)}.")] = None,
    reconstruct_position_power: Annotated[Optional[float], typer.Option(
        help="Override the profile: each token's squared error in the repair's fit weighs (its position "
        "in the window + 1) ** this, the first token (the attention sink) as the last, mean 1 (1 in quick, "
        "laptop-16gb and workstation-64gb; 0, every token alike, in the others).")] = None,
    reconstruct_gap_weight: Annotated[Optional[float], typer.Option(
        help="Override the profile: above 0 the repair runs twice, and the second weighs each token's "
        "error also by how much more the first's model lost on the next token than the dense model: "
        "(1 - this) + this x loss / mean loss (0.75 in quick, 0 in the others; needs --reconstruct-target "
        "dense or stream; twice the repair's time).")] = None,
    reconstruct_dtype: Annotated[Optional[str], typer.Option(
        help="Override the profile: the dtype of the repair's passes through the blocks, on the CPU: "
        "float32, bfloat16, float16 or auto (the CPU's fastest matmul, measured; every shipped profile "
        "but quick). The streams, the moments and the solves stay float32 / float64.")] = None,
    masks_per_round: Annotated[Optional[int], typer.Option(help="Override the profile.")] = None,
    calib_seqs: Annotated[Optional[int], typer.Option(help="Override the profile.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Override the profile.")] = None,
    prune_frac: Annotated[Optional[float], typer.Option(help="Override the profile.")] = None,
    min_width: Annotated[Optional[float], typer.Option(
        help="Override the profile: every layer's attention and MLP keep at least this share of their "
        "source width (rounded up to a whole head group / align channels; 0.25 in quick, laptop-16gb and laptop-8gb, 0 in the others); "
        "at 0 a module may go down to one head group and align channels.")] = None,
    calib_windows: Annotated[Optional[str], typer.Option(
        help=f"Override the profile: which windows the prior pass and the masks read: "
        f"{one_of(CalibWindows, helped=True)}.")] = None,
    prior: Annotated[Optional[str], typer.Option(
        help=f"Override the profile's prior: {one_of(Prior)}.")] = None,
    estimator: Annotated[Optional[str], typer.Option(
        help=f"Override the profile: {one_of(Estimator, helped=True)}.")] = None,
    allocation: Annotated[Optional[str], typer.Option(
        help=f"Override the profile: {one_of(Allocation, helped=True)}.")] = None,
    mask_counts: Annotated[Optional[str], typer.Option(
        help=f"Override the profile: {one_of(MaskCounts, helped=True)}.")] = None,
    score: Annotated[Optional[str], typer.Option(
        help=f"Override the profile: {one_of(Score, helped=True)}.")] = None,
    head_unit: Annotated[Optional[str], typer.Option(
        help=f"Override the profile: {one_of(HeadUnit, helped=True)}.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out (and any saved progress).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a prune that stopped (crash, kill, Ctrl-C).")] = False,
    memory: Annotated[Optional[str], typer.Option(
        help=MEMORY_HELP.format(what="the smaller of the profile's memory_gb and "))] = None,
) -> None:
    """Prune a model with Bonsai: score sub-models with forward passes, regress, remove, repeat.

    Writes OUT/config.json (with per-layer widths), safetensors shards, tokenizer files, plan.json,
    report.json and pruning.png. Blocks are streamed from disk: memory stays near a few blocks plus
    the hidden states of one wave of masks.

    Started by torchrun (``torchrun ... -m lowmem_bonsai prune ...``), the ranks share one prune:
    rank 0 writes OUT; see the README's "Distributed pruning".
    """
    from .engine.ranks import join
    from .pipeline import prune_model, work_dir

    prof = load_profile(profile).replace(
        masks_per_round=masks_per_round, calib_seqs=calib_seqs, seq_len=seq_len, prune_frac=prune_frac,
        min_width=min_width, prior=prior, estimator=estimator, head_unit=head_unit, allocation=allocation,
        mask_counts=mask_counts, score=score, calib_windows=calib_windows,
        reconstruct_seqs=reconstruct_seqs, reconstruct_target=reconstruct_target,
        reconstruct_position_power=reconstruct_position_power, reconstruct_gap_weight=reconstruct_gap_weight,
        reconstruct_dtype=reconstruct_dtype).with_repair(reconstruct)
    prof, budget = _budgeted(prof, memory)
    ranks = join(timeout_s=prof.dist_timeout_s, device=prof.device)
    bars = _Bars()
    try:
        # The budget is logged when the work starts (-v) and printed at the end: a refusal stays one line.
        report = _explained(prune_model, budget)(
            model_dir=model, out_dir=out, sparsity=sparsity, profile=prof, calib=calib, method=method,
            seed=seed, force=force, resume=resume, progress=bars if ranks.main else None,
            memory_budget=budget.line(), ranks=ranks)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (Terminated)
        bars.close()
        if work_dir(out).is_dir():
            exc.add_note(f"progress is saved in {work_dir(out)}; run the same command with --resume "
                         "to continue")
        raise
    except UserError:
        raise  # one line; a prune's own refusal says what became of its progress
    except Exception:  # a bug: its traceback follows; say what became of the progress
        if work_dir(out).is_dir():
            typer.echo(f"progress is saved in {work_dir(out)}: rerun with --resume to continue, or "
                       "with --force to start over", err=True)
        raise
    finally:
        bars.close()
        ranks.close()
    if report is None:  # another rank than 0: rank 0 says what was written
        typer.echo(f"rank {ranks.rank} of {ranks.world}: done; rank 0 writes {out}")
        return
    typer.echo(
        f"pruned {report['params_before']:,} -> {report['params_after']:,} block parameters "
        f"(sparsity {report['achieved_sparsity']:.3f}) in {len(report['rounds'])} "
        f"round{'' if len(report['rounds']) == 1 else 's'}, "
        f"{report['forward_tokens']:,} forward tokens{_repair_tokens(report)}, {report['seconds']:.0f} s -> {out}"
    )
    last = report["rounds"][-1] if report["rounds"] else None
    if last and last["params_after"] == last["params_before"]:
        typer.echo(f"stopped at sparsity {report['achieved_sparsity']:.3f} of the target "
                   f"{report['target_sparsity']:.3f}: no module could lose another unit (every layer keeps "
                   "one KV group and `align` MLP channels, and masks perturb only eligible units)")
    typer.echo(budget.line())


@app.command("export-gguf")
def export_gguf_cmd(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder, dense or pruned (per-layer widths).")],
    out: Annotated[Path, typer.Option("--out", help="The .gguf file to write.")],
    type: Annotated[str, typer.Option(
        "--type", help="f32, f16, bf16, q8_0 (written directly); q4_0, q4_1, q5_0, q5_1, q2_k, "
        "q3_k_s/m/l, q4_k_s/m, q5_k_s/m, q6_k (by llama.cpp's quantizer).")] = "f16",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
) -> None:
    """Write a GGUF that llama.cpp serves; pruned models with per-layer widths use arch 'deci'.

    Tensors are streamed one at a time from the checkpoint's shards; the file appears only when
    complete.
    """
    from .llamacpp.to_gguf import export_gguf

    path = export_gguf(model_dir=model, out=out, type=type, force=force)
    typer.echo(f"wrote {path}")


@app.command("generate")
def generate_cmd(
    gguf_file: Annotated[Path, typer.Argument(help="A .gguf model file.")],
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue (or, with --chat, to answer).")],
    n_tokens: Annotated[int, typer.Option("-n", "--n-tokens", help="Tokens to generate.")] = 64,
    chat: Annotated[bool, typer.Option(
        "--chat", help="Wrap the prompt in the GGUF's chat template.")] = False,
    temperature: Annotated[float, typer.Option(help="0 = greedy; above 0, seeded sampling.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Generate text from a GGUF with llama.cpp."""
    from .llamacpp.runner import generate

    text = generate(gguf=gguf_file, prompt=prompt, n_tokens=n_tokens, chat=chat, seed=seed,
                    temperature=temperature)
    typer.echo(text)


@app.command("serve")
def serve_cmd(
    gguf_file: Annotated[Path, typer.Argument(help="A .gguf model file (lowmem-bonsai export-gguf makes one).")],
    host: Annotated[str, typer.Option(
        help="Address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8080,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help=(
        "Context window in tokens (prompt + answer); at most the model's own (its GGUF's "
        "context_length, with rope scaling). Default: 2048, or the model's where that is smaller."))] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: half the cores).")] = None,
) -> None:
    """Serve a GGUF with llama.cpp's OpenAI-compatible HTTP server until Ctrl-C.

    POST /v1/chat/completions answers with the GGUF's chat template; /v1/completions continues text.
    Needs llama-cpp-python's server extra (tools/setup.sh installs it).
    """
    from .llamacpp.serve import serve

    _check_threads(threads)

    def started(url: str) -> None:
        typer.echo(f"serving {gguf_file} at {url} (POST {url}/chat/completions; Ctrl-C stops)", err=True)

    serve(gguf=gguf_file, host=host, port=port, n_ctx=ctx, threads=threads, on_start=started)


if __name__ == "__main__":  # pragma: no cover
    app()
