"""Broken checkpoints: each problem is one line naming the file and the fix, exit status 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lowmem_bonsai.model.checkpoint import Checkpoint
from lowmem_bonsai.cli import app
from lowmem_bonsai.errors import UserError
from lowmem_bonsai.engine.forward import streamed_nll

from .conftest import make_tiny, write_word_tokenizer


@pytest.fixture
def model_dir(tmp_path, sample_text):
    d = tmp_path / "m"
    make_tiny(d, "llama-gqa-tied")
    write_word_tokenizer(d, sample_text.read_text())
    return d


def shard_into_two(d):
    """Rewrite model.safetensors as two shards with an index."""
    tensors = load_file(d / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, ns in halves.items():
        save_file({n: tensors[n] for n in ns}, d / shard)
    (d / "model.safetensors").unlink()
    weight_map = {n: shard for shard, ns in halves.items() for n in ns}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def truncate(path, keep_bytes):
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes] if keep_bytes >= 0 else data[:keep_bytes])


CASES = {
    "missing config": (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    "config not json": (lambda d: (d / "config.json").write_text("{nope"), "not valid JSON"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "truncated shard": (lambda d: truncate(d / "model.safetensors", -1000), "truncated"),
    "corrupt header": (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"),
                       "not a readable safetensors"),
    "header beyond file": (lambda d: truncate(d / "model.safetensors", 5000), "truncated"),
    "unsupported architecture": (lambda d: edit_config(d, architectures=["GPT2LMHeadModel"]),
                                 "supported: LlamaForCausalLM"),
    "unsupported rope": (lambda d: edit_config(d, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
                         "rope scaling 'yarn' is not supported"),
    "shape disagrees": (lambda d: edit_config(d, intermediate_size=128), "config.json implies"),
    "missing shard": (lambda d: (shard_into_two(d), (d / "model-00002-of-00002.safetensors").unlink()),
                      "which is missing"),
    "index names absent tensor": (
        lambda d: (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            **shard_into_two(d), "model.layers.9.mlp.up_proj.weight": "model-00001-of-00002.safetensors"}})),
        "does not hold it"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_checkpoint_is_one_clear_line(model_dir, sample_text, case):
    breaker, words = CASES[case]
    breaker(model_dir)
    res = CliRunner().invoke(app, ["eval", str(model_dir), "--data", str(sample_text), "--seq-len", "16",
                                   "--max-seqs", "1"])
    assert res.exit_code == 2, res.output
    assert words in res.output and "Traceback" not in res.output
    assert res.output.count("\n") <= 2  # one line (plus a progress bar's remains)


def test_sharded_checkpoint_reads_like_single_file(model_dir):
    tokens = torch.randint(0, 211, (2, 12), generator=torch.Generator().manual_seed(0))
    single = streamed_nll(Checkpoint(model_dir), tokens)
    shard_into_two(model_dir)
    torch.testing.assert_close(streamed_nll(Checkpoint(model_dir), tokens), single, rtol=0, atol=0)


def test_debug_shows_the_traceback(model_dir, sample_text):
    (model_dir / "config.json").unlink()
    res = CliRunner().invoke(app, ["--debug", "eval", str(model_dir), "--data", str(sample_text)])
    assert res.exit_code != 0 and isinstance(res.exception, UserError)
