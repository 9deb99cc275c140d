from __future__ import annotations

import json
import math

import torch
from typer.testing import CliRunner

from lowmem_bonsai.cli import app
from lowmem_bonsai.data import load_tokenizer, tokenize_file, windows
from lowmem_bonsai.evaluate import evaluate

from .conftest import hf_nll, make_tiny, write_word_tokenizer


def test_eval_perplexity_equals_transformers(tmp_path, sample_text):
    model_dir = tmp_path / "m"
    model = make_tiny(model_dir, "qwen2-bias")
    write_word_tokenizer(model_dir, sample_text.read_text())
    result = evaluate(model_dir=model_dir, data=sample_text, seq_len=32, max_seqs=7, batch_seqs=3)
    seqs = windows(tokenize_file(load_tokenizer(model_dir), sample_text), seq_len=32, max_seqs=7)
    ref = math.exp(float(hf_nll(model, seqs).sum()) / (7 * 31))
    assert result.tokens == 7 * 31 and result.sequences == 7
    assert abs(result.perplexity / ref - 1) < 1e-4


def test_windows_protocol():
    ids = torch.arange(103)
    w = windows(ids, seq_len=10)
    assert w.shape == (10, 10) and w[3, 0] == 30  # last partial window dropped
    assert windows(ids, seq_len=10, max_seqs=4, skip=2)[0, 0] == 20


def test_cli_eval_writes_json_and_refuses_bad_data(tmp_path, sample_text):
    model_dir = tmp_path / "m"
    make_tiny(model_dir, "llama-gqa-tied")
    write_word_tokenizer(model_dir, sample_text.read_text())
    runner = CliRunner()
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", str(model_dir), "--data", str(sample_text), "--seq-len", "32",
                              "--max-seqs", "4", "--json", str(out)])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    assert got["tokens"] == 4 * 31 and got["seq_len"] == 32 and got["sequences"] == 4
    assert got["perplexity"] > 1 and got["seconds"] > 0

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\x01\x02abc")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    for bad, words in [(tmp_path / "nope.txt", "not found"), (empty, "empty"),
                       (binary, "binary"), (latin, "not UTF-8")]:
        res = runner.invoke(app, ["eval", str(model_dir), "--data", str(bad)])
        assert res.exit_code == 2, res.output
        assert words in res.output and "Traceback" not in res.output
