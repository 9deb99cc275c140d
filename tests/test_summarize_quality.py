"""tools/summarize_quality.py: the seeds' mean and range per method and sparsity, the README's names
for --only, and a plot in which no marker hides another of the same budget and sparsity."""

from __future__ import annotations

import json

import pytest

from .conftest import load_tool


def row(method, ppl, sparsity=0.3, seed=0, tokens=100_000):
    return {"method": method, "sparsity": sparsity, "seed": seed, "perplexity": ppl,
            "forward_tokens": tokens, "achieved": sparsity}


DENSE = {"method": "dense", "sparsity": 0.0, "perplexity": 40.0, "forward_tokens": 0, "achieved": 0.0}


def test_mean_and_range_over_seeds_under_the_readmes_names(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [DENSE, row("bonsai", 60.0, seed=0), row("bonsai", 66.0, seed=1), row("bonsai", 57.0, seed=2),
            row("flap", 80.0, tokens=50_000), row("prior", 70.0, tokens=50_000), row("magnitude", 500.0)]
    src = tmp_path / "results.json"
    src.write_text(json.dumps(rows))
    load_tool("summarize_quality").main([str(src), "--out", str(tmp_path / "sum"), "--only", "bonsai=Bonsai", "flap=FLAP", "prior"])
    got = json.loads((tmp_path / "sum.json").read_text())
    assert got["dense"] == 40.0
    by = {r["method"]: r for r in got["rows"]}
    assert set(by) == {"Bonsai", "FLAP", "prior"}  # magnitude was not asked for
    b = by["Bonsai"]
    assert b["seeds"] == [0, 1, 2] and b["perplexity_mean"] == pytest.approx(61.0)
    assert (b["perplexity_min"], b["perplexity_max"]) == (57.0, 66.0) and b["x_dense"] == pytest.approx(61.0 / 40)
    md = (tmp_path / "sum.md").read_text()
    assert "| 30% | Bonsai | 0,1,2 | 61.00 [57.00-66.00] | 1.52 | 100,000 |" in md
    assert (tmp_path / "sum.png").stat().st_size > 10_000


def test_only_names_a_method_that_is_not_there(tmp_path):
    src = tmp_path / "results.json"
    src.write_text(json.dumps([DENSE, row("bonsai", 60.0)]))
    with pytest.raises(SystemExit, match="no rows of \\['flap'\\]"):
        load_tool("summarize_quality").main([str(src), "--out", str(tmp_path / "sum"), "--only", "bonsai", "flap=FLAP"])


def test_one_budget_at_one_sparsity_is_spread_sideways_in_the_methods_order():
    tool = load_tool("summarize_quality")
    summary = [{"method": m, "sparsity": sp, "forward_tokens": t}
               for m, sp, t in [("prior", 0.3, 500), ("flap", 0.3, 500), ("bonsai", 0.3, 900),
                                ("flap", 0.5, 500), ("magnitude", 0.3, 500), ("prior", 0.5, 500),
                                ("bonsai", 0.5, 700)]]
    x = tool.positions(summary, ["flap", "prior", "bonsai"], step=1.1)
    # flap, prior, then the unlisted magnitude: 500 / 1.1, 500, 500 * 1.1
    assert x[1] == pytest.approx(500 / 1.1) and x[0] == pytest.approx(500) and x[4] == pytest.approx(550)
    # two of a budget sit half a step either side of it
    assert x[3] == pytest.approx(500 / 1.1 ** 0.5) and x[5] == pytest.approx(500 * 1.1 ** 0.5)
    assert x[2] == 900 and x[6] == 700  # alone in their budget and sparsity: where they are
