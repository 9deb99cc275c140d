"""tools/position_gap.py: the per-position losses it reports are the streamed eval's, split by position."""

from __future__ import annotations

import json
import math

from lowmem_bonsai.evaluate import evaluate
from lowmem_bonsai.pipeline import prune_model
from lowmem_bonsai.profiles import load_profile

from .conftest import load_tool, make_tiny, write_word_tokenizer


def test_position_gap_splits_the_eval_by_position(tmp_path, sample_text, capsys):
    tool = load_tool("position_gap")
    assert tool.buckets(256) == [(0, 1), (1, 4), (4, 16), (16, 64), (64, 128), (128, 255)]
    assert tool.buckets(10) == [(0, 1), (1, 4), (4, 9)]
    make_tiny(tmp_path / "m", "llama-gqa-tied", layers=2, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2)
    write_word_tokenizer(tmp_path / "m", sample_text.read_text())
    profile = load_profile(None).replace(seq_len=32, calib_seqs=4, masks_per_round=8, align=8,
                                         prune_frac=0.2, reconstruct="lsq", reconstruct_seqs=8,
                                         reconstruct_seq_len=32, reconstruct_dtype="float32")
    prune_model(model_dir=tmp_path / "m", out_dir=tmp_path / "p", sparsity=0.3, calib=sample_text, seed=0,
                profile=profile, method="prior")
    args = ["--dense", str(tmp_path / "m"), "--data", str(sample_text), "--skip", "8", "--windows", "6",
            "--seq-len", "32"]
    assert tool.main(args + ["--pruned", str(tmp_path / "p"), "--json", str(tmp_path / "g.json")]) == 0
    got = json.loads((tmp_path / "g.json").read_text())
    sizes = [hi - lo for lo, hi in tool.buckets(32)]
    for key, model in (("dense_nll", "m"), ("pruned_nll", "p")):
        mean = sum(r[key] * n for r, n in zip(got["gap_by_position"], sizes)) / sum(sizes)
        ref = evaluate(model_dir=tmp_path / model, data=sample_text, seq_len=32, max_seqs=6, skip=8)
        assert math.isclose(mean, ref.nll, rel_tol=1e-4)
    assert math.isclose(got["all_gap_nats"], sum(r["gap_nats"] * n for r, n in
                                                 zip(got["gap_by_position"], sizes)) / sum(sizes), rel_tol=1e-5)
    assert len(got["stream_error_by_layer"]) == 2 and got["stream_error_by_layer"]["1"][-1] > 0
    fifths = got["gap_by_dense_nll"]  # every token but position 0's, once: the same gap in all
    assert len(fifths) == 5 and sum(r["tokens"] for r in fifths) == 6 * 30
    assert all(a["dense_nll_range"][1] == b["dense_nll_range"][0] for a, b in zip(fifths, fifths[1:]))
    assert all(lo <= r["dense_nll"] <= hi for r in fifths for lo, hi in [r["dense_nll_range"]])  # split by dense NLL
    assert [r["dense_nll"] for r in fifths] == sorted(r["dense_nll"] for r in fifths)
    assert all(30 <= r["tokens"] <= 42 for r in fifths)  # fifths of 180 tokens (ties may shift a few)
    later = sum(r["gap_nats"] * n for r, n in zip(got["gap_by_position"][1:], sizes[1:])) / sum(sizes[1:])
    assert math.isclose(sum(r["gap_nats"] * r["tokens"] for r in fifths) / (6 * 30), later, rel_tol=1e-4, abs_tol=1e-6)
    assert "gap (nats)" in capsys.readouterr().out
    assert tool.main(args + ["--pruned", str(tmp_path / "m"), "--json", str(tmp_path / "same.json")]) == 0
    same = json.loads((tmp_path / "same.json").read_text())
    assert all(r["gap_nats"] == 0 for r in same["gap_by_position"] + same["gap_by_dense_nll"])
    assert all(r["pruned_nll"] == r["dense_nll"] for r in same["gap_by_dense_nll"])
    assert all(e == 0 for errs in same["stream_error_by_layer"].values() for e in errs)
