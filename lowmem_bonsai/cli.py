"""The command line: thin wrappers that parse flags and call one library function each."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from .errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Structured pruning of LLMs with forward passes only (Bonsai), streamed from disk, "
    "for machines with less memory than the model.",
)

_state = {"debug": False}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    _state["debug"] = debug
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
    model: Annotated[Path, typer.Argument(help="Checkpoint folder (config.json + safetensors).")],
    data: Annotated[Path, typer.Option("--data", help="UTF-8 text file to measure perplexity on.")],
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    max_seqs: Annotated[Optional[int], typer.Option(help="Use only the first N windows.")] = None,
    skip: Annotated[int, typer.Option(help="Skip the first N windows (e.g. used for calibration).")] = 0,
    batch_seqs: Annotated[int, typer.Option(help="Windows per streamed pass over the blocks.")] = 8,
    dtype: Annotated[str, typer.Option(help="Compute dtype: float32, bfloat16 or float16.")] = "float32",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the result as JSON.")] = None,
) -> None:
    """Perplexity: the whole file tokenized once (no BOS), cut into non-overlapping windows of
    --seq-len tokens (the last partial one dropped), exp(mean next-token NLL) over all of them."""
    from tqdm import tqdm

    from .evaluate import evaluate
    from .outputs import write_json_atomic

    if threads:
        torch.set_num_threads(threads)
    bar = tqdm(desc="eval", unit="seq", disable=None)

    def on_batch(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    result = _run(evaluate, model_dir=model, data=data, seq_len=seq_len, max_seqs=max_seqs, skip=skip,
                  batch_seqs=batch_seqs, dtype=_run(_dtype, dtype), on_batch=on_batch)
    bar.close()
    typer.echo(f"perplexity {result.perplexity:.4f}  ({result.tokens} tokens, {result.sequences} x "
               f"{result.seq_len}, {result.seconds:.1f} s)")
    if json_out is not None:
        _run(write_json_atomic, json_out, result.to_json())


if __name__ == "__main__":  # pragma: no cover
    app()
