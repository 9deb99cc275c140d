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

from .config import DTYPES
from .errors import Terminated, UserError
from .profiles import DEFAULT_PROFILE, load_profile, profile_names

PROFILE_HELP = (f"Profile: one of {', '.join(profile_names())} (default {DEFAULT_PROFILE}), "
                "or the path of a .toml file.")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Structured pruning of LLMs with forward passes only (Bonsai), streamed from disk, "
    "for machines with less memory than the model.",
)

_state = {"debug": False}



def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"dtype '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _run(fn, *args, **kwargs):
    """Call into the library; a UserError becomes one line on stderr and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except Terminated:
        typer.echo("terminated", err=True)
        raise typer.Exit(Terminated.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


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
    dtype: Annotated[str, typer.Option(help="Storage dtype: float16, bfloat16 or float32.")] = "float16",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")] = False,
) -> None:
    """Turn a GGUF into a Hugging Face checkpoint (config.json, safetensors, tokenizer.json).

    Tensors are dequantized one at a time and llama.cpp's q/k row order is undone, so memory stays
    near the size of the largest tensor.
    """
    from .gguf_import import import_gguf

    _dtype(dtype)
    path = _run(import_gguf, gguf_path=gguf_file, out_dir=out, dtype=dtype, force=force)
    typer.echo(f"wrote {path}")


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Argument(
        help="Checkpoint folder (config.json + safetensors), or a .gguf file (run by llama.cpp).")],
    data: Annotated[Path, typer.Option("--data", help="UTF-8 text file to measure perplexity on.")],
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    max_seqs: Annotated[Optional[int], typer.Option(help="Use only the first N windows.")] = None,
    skip: Annotated[int, typer.Option(help="Skip the first N windows (e.g. used for calibration).")] = 0,
    batch_seqs: Annotated[int, typer.Option(help="Windows per streamed pass over the blocks.")] = 8,
    dtype: Annotated[str, typer.Option(help="Compute dtype: float32, bfloat16 or float16.")] = "float32",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's).")] = None,
    device: Annotated[str, typer.Option(help="Where a checkpoint's blocks compute: cpu, cuda or cuda:N.")] = "cpu",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON.")] = None,
) -> None:
    """Perplexity: the whole file tokenized once (no BOS), cut into non-overlapping windows of
    --seq-len tokens (the last partial one dropped), exp(mean next-token NLL) over all of them."""
    from tqdm import tqdm

    from .evaluate import evaluate
    from .outputs import check_output_path, make_dirs, write_json_atomic

    _run(_check_threads, threads)
    if json_out is not None:  # refused before the evaluation, not after it
        _run(check_output_path, json_out, flag="--json", folder=False)
        _run(make_dirs, json_out.parent)
    if threads:
        torch.set_num_threads(threads)
    bar = tqdm(desc="eval", unit="seq", disable=None)

    def on_batch(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    if model.suffix == ".gguf" and not model.is_dir():  # llama.cpp tokenizes and runs it
        from .llama_runner import gguf_perplexity

        result = _run(gguf_perplexity, gguf=model, data=data, seq_len=seq_len, max_seqs=max_seqs,
                      skip=skip, threads=threads, on_batch=on_batch)
    else:
        result = _run(evaluate, model_dir=model, data=data, seq_len=seq_len, max_seqs=max_seqs,
                      skip=skip, batch_seqs=batch_seqs, dtype=_run(_dtype, dtype), device=device,
                      on_batch=on_batch)
    bar.close()
    typer.echo(f"perplexity {result.perplexity:.4f}  ({result.tokens} tokens, {result.sequences} x "
               f"{result.seq_len}, {result.seconds:.1f} s)")
    if json_out is not None:
        _run(write_json_atomic, json_out, result.to_json())


@app.command("estimate")
def estimate_cmd(
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to prune.")],
    profile: Annotated[Optional[str], typer.Option(help=PROFILE_HELP)] = None,
    sparsity: Annotated[float, typer.Option(help="Target sparsity.")] = 0.5,
    method: Annotated[str, typer.Option(help="bonsai, or a baseline (no masks).")] = "bonsai",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Before any work: peak memory by component, disk needed, forward FLOPs per round and an ETA
    from a matmul rate measured on this machine in about a second."""
    from .estimate import estimate

    prof = _run(load_profile, profile)
    e = _run(estimate, model_dir=model, profile=prof, sparsity=sparsity, method=method)
    if as_json:
        typer.echo(json.dumps(e, indent=2))
        return
    m = e["memory"]
    typer.echo(f"model      {e['params_total'] / 1e9:.2f} B params ({e['params_blocks'] / 1e9:.2f} B in blocks)")
    typer.echo(f"profile    {e['profile']}: budget {m['budget_gb']:.1f} GiB, compute {e['compute_dtype']} "
               f"on {e['device']}")
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
    typer.echo(f"disk       {e['disk_output_gb']:.2f} GiB for the pruned model")
    typer.echo(f"compute    {e['rounds']} rounds, {e['forward_tokens_per_round']:,} forward tokens and "
               f"{e['forward_tflops_per_round'][0]:.1f} TFLOP in the first; {e['forward_tflops_total']:.1f} TFLOP in all")
    if e["eta_hours"] is None:
        typer.echo(f"speed      no {e['device']} device visible here to measure: no ETA")
        return
    typer.echo(f"speed      {e['matmul_gflops_measured']:.0f} GFLOP/s measured matmul rate on {e['device']}")
    typer.echo(f"ETA        {e['eta_hours']:.2f} h")


class _Bars:
    """tqdm bars, one per stage, fed by the library's progress callback."""

    LABELS = {"round": "rounds", "prior": "prior pass (blocks)", "masks": "masked passes (blocks)",
              "write": "writing shards (blocks)"}

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
    model: Annotated[Path, typer.Argument(help="Checkpoint folder to prune (config.json + safetensors).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the pruned checkpoint.")],
    calib: Annotated[Path, typer.Option(
        help="Calibration text (UTF-8); the first calib_seqs windows of seq_len tokens are used.")],
    sparsity: Annotated[float, typer.Option(help="Fraction of non-embedding parameters to remove.")] = 0.5,
    profile: Annotated[Optional[str], typer.Option(
        help=PROFILE_HELP)] = None,
    method: Annotated[str, typer.Option(
        help="bonsai (regression on sub-model losses), prior (structured Wanda), magnitude, random.")] = "bonsai",
    seed: Annotated[int, typer.Option(help="Seed for mask sampling and the random baseline.")] = 0,
    masks_per_round: Annotated[Optional[int], typer.Option(help="Override the profile.")] = None,
    calib_seqs: Annotated[Optional[int], typer.Option(help="Override the profile.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Override the profile.")] = None,
    prune_frac: Annotated[Optional[float], typer.Option(help="Override the profile.")] = None,
    prior: Annotated[Optional[str], typer.Option(
        help="Override the profile's prior: wanda, magnitude, fluctuation, random.")] = None,
    estimator: Annotated[Optional[str], typer.Option(
        help="Override the profile: lasso, ridge, or prior (fit only per-kind/per-module scales).")] = None,
    allocation: Annotated[Optional[str], typer.Option(
        help="Override the profile: uniform (every module loses the round's share) or global (units "
        "ranked by estimated loss per parameter across modules).")] = None,
    mask_counts: Annotated[Optional[str], typer.Option(
        help="Override the profile: fixed (every mask drops half of each module's eligible units) or "
        "varied (random counts, so layer sensitivities are identifiable).")] = None,
    score: Annotated[Optional[str], typer.Option(
        help="Override the profile: nll (calibration text) or kl (to the unpruned model's top-64).")] = None,
    head_unit: Annotated[Optional[str], typer.Option(
        help="Override the profile: group (whole KV groups) or query (the same query heads from "
        "every group).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out (and any saved progress).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a prune that stopped (crash, kill, Ctrl-C).")] = False,
) -> None:
    """Prune a model with Bonsai: score sub-models with forward passes, regress, remove, repeat.

    Writes OUT/config.json (with per-layer widths), safetensors shards, tokenizer files, plan.json,
    report.json and pruning.png. Blocks are streamed from disk: memory stays near a few blocks plus
    the hidden states of one wave of masks.
    """
    from .pipeline import prune_model, work_dir

    prof = _run(load_profile, profile)
    prof = _run(prof.replace, masks_per_round=masks_per_round, calib_seqs=calib_seqs, seq_len=seq_len,
                prune_frac=prune_frac, prior=prior, estimator=estimator, head_unit=head_unit,
                allocation=allocation, mask_counts=mask_counts, score=score)
    bars = _Bars()
    try:
        report = _run(prune_model, model_dir=model, out_dir=out, sparsity=sparsity, profile=prof,
                      calib=calib, method=method, seed=seed, force=force, resume=resume,
                      progress=bars)
    except typer.Exit as exc:
        bars.close()
        if exc.exit_code in (130, Terminated.exit_code) and work_dir(out).exists():
            typer.echo(f"progress is saved in {work_dir(out)}; run the same command with --resume "
                       "to continue", err=True)
        raise
    except Exception:  # a bug: its traceback follows; say what became of the progress
        if work_dir(out).exists():
            typer.echo(f"progress is saved in {work_dir(out)}: rerun with --resume to continue, or "
                       "with --force to start over", err=True)
        raise
    finally:
        bars.close()
    typer.echo(
        f"pruned {report['params_before']:,} -> {report['params_after']:,} block parameters "
        f"(sparsity {report['achieved_sparsity']:.3f}) in {len(report['rounds'])} rounds, "
        f"{report['forward_tokens']:,} forward tokens, {report['seconds']:.0f} s -> {out}"
    )


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
    from .gguf_export import export_gguf

    path = _run(export_gguf, model_dir=model, out=out, type=type, force=force)
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
    from .llama_runner import generate

    text = _run(generate, gguf=gguf_file, prompt=prompt, n_tokens=n_tokens, chat=chat, seed=seed,
                temperature=temperature)
    typer.echo(text)


if __name__ == "__main__":  # pragma: no cover
    app()
