from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from lowmem_bonsai.cli import app
from lowmem_bonsai.data import load_tokenizer, tokenize_file, windows
from lowmem_bonsai.errors import UserError
from lowmem_bonsai.evaluate import evaluate, paired_below

from .conftest import hf_nll, load_tool, make_tiny, write_word_tokenizer


def test_eval_perplexity_equals_transformers(tmp_path, sample_text):
    model_dir = tmp_path / "m"
    model = make_tiny(model_dir, "qwen2-bias")
    write_word_tokenizer(model_dir, sample_text.read_text())
    result = evaluate(model_dir=model_dir, data=sample_text, seq_len=32, max_seqs=7, batch_seqs=3)
    seqs = windows(tokenize_file(load_tokenizer(model_dir), sample_text), seq_len=32, max_seqs=7)
    per_window = hf_nll(model, seqs) / 31
    ref = math.exp(float(per_window.mean()))
    assert result.tokens == 7 * 31 and result.sequences == 7
    assert abs(result.perplexity / ref - 1) < 1e-4
    # each window's own mean NLL, in order: what a paired comparison resamples
    assert torch.allclose(torch.tensor(result.window_nll, dtype=torch.float64), per_window, atol=1e-4)
    assert math.isclose(math.exp(sum(result.window_nll) / 7), result.perplexity, rel_tol=1e-9)


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


def test_paired_below_matches_the_normal_interval():
    """One model against a reference: below = 1 - exp(mean of the per-window NLL differences), and
    with many windows the bootstrap's interval is the normal one, exp(mean +- 1.96 sd / sqrt(W))."""
    gen = torch.Generator().manual_seed(1)
    ref = 3.5 + 0.4 * torch.randn(400, generator=gen, dtype=torch.float64)
    diff = -0.05 + 0.1 * torch.randn(400, generator=gen, dtype=torch.float64)
    res = paired_below(ref.tolist(), [(ref + diff).tolist()], samples=20_000, goal=0.05)
    assert math.isclose(res.below, 1 - math.exp(float(diff.mean())), rel_tol=1e-9)
    half = 1.96 * float(diff.std()) / 20
    lo, hi = 1 - math.exp(float(diff.mean()) + half), 1 - math.exp(float(diff.mean()) - half)
    assert abs(res.low - lo) < 0.15 * half and abs(res.high - hi) < 0.15 * half
    # the share of resamples at least 5 % below: P(mean* <= log(0.95)) under the same normal
    z = (math.log(0.95) - float(diff.mean())) / (float(diff.std()) / 20)
    assert abs(res.share_at_least - 0.5 * (1 + math.erf(z / math.sqrt(2)))) < 0.03
    # a constant shift in every window leaves nothing to resample: the interval is the point
    flat = paired_below(ref.tolist(), [(ref - 0.1).tolist(), (ref - 0.1).tolist()], samples=1000)
    assert math.isclose(flat.low, flat.below, abs_tol=1e-12) and math.isclose(flat.high, flat.below, abs_tol=1e-12)
    assert math.isclose(flat.below, 1 - math.exp(-0.1), rel_tol=1e-9)


def test_paired_below_averages_seeds_and_refuses_bad_input():
    ref = [4.0, 3.0, 5.0]
    res = paired_below(ref, [[x - 0.1 for x in ref], [x + 0.1 for x in ref]], samples=1000)
    mean = (math.exp(4.0 - 0.1) + math.exp(4.0 + 0.1)) / 2  # the mean of the two perplexities
    assert math.isclose(res.below, 1 - mean / math.exp(4.0), rel_tol=1e-9) and res.below < 0
    for bad, msg in (([ref, []], "at least one model"), ([ref, [[1.0, 2.0]]], "same windows"),
                     ([[1.0], [[1.0]]], "at least 2 windows"), ([ref, [[float("nan")] * 3]], "NaN")):
        with pytest.raises(UserError, match=msg):
            paired_below(bad[0], bad[1])


def test_paired_ppl_tool(tmp_path, capsys):
    tool = load_tool("paired_ppl")
    windows = {"seq_len": 256, "sequences": 4, "skip": 10, "tokens": 1020, "data": "/a/valid.txt"}
    ref, good = tmp_path / "ref.json", tmp_path / "s0.json"
    ref.write_text(json.dumps(windows | {"window_nll": [4.0, 3.8, 4.2, 4.1]}))
    good.write_text(json.dumps(windows | {"data": "/b/valid.txt", "window_nll": [3.9, 3.7, 4.1, 4.0]}))
    out = tmp_path / "cmp.json"
    assert tool.main(["--reference", str(ref), "--models", str(good), "--goal", "0.1", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert math.isclose(got["below"], 1 - math.exp(-0.1), rel_tol=1e-9) and got["share_at_least"] == 0.0
    assert got["reference_file"] == "ref.json" and got["model_files"] == ["s0.json"]
    assert math.isclose(got["reference"], math.exp(4.025), rel_tol=1e-9)  # the reference's perplexity
    assert "below" in capsys.readouterr().out
    other = tmp_path / "other.json"
    other.write_text(json.dumps(windows | {"skip": 11, "window_nll": [3.9, 3.7, 4.1, 4.0]}))
    old = tmp_path / "old.json"
    old.write_text(json.dumps(windows))  # an eval JSON from before window_nll
    for bad, msg in ((other, "differs in skip"), (old, "no per-window NLLs"), (tmp_path / "none.json", "cannot read")):
        assert tool.main(["--reference", str(ref), "--models", str(bad)]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1
