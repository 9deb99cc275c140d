"""Broken checkpoints: each problem is one line naming the file and the fix, exit status 2."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from lowmem_bonsai.model.checkpoint import Checkpoint
from lowmem_bonsai.cli import app
from lowmem_bonsai.errors import UserError
from lowmem_bonsai.engine.forward import streamed_nll

from .conftest import BROKEN_CHECKPOINTS, make_tiny, shard_into_two, write_word_tokenizer


@pytest.fixture
def model_dir(tmp_path, sample_text):
    d = tmp_path / "m"
    make_tiny(d, "llama-gqa-tied")
    write_word_tokenizer(d, sample_text.read_text())
    return d


@pytest.mark.parametrize("case", sorted(BROKEN_CHECKPOINTS))
def test_broken_checkpoint_is_one_clear_line(model_dir, sample_text, case):
    breaker, words = BROKEN_CHECKPOINTS[case]
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
