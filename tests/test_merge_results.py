"""tools/merge_results.py: one split's rows of several bench_quality.py files, the latest of each
model, eval-only rows completed from the same model's row on another split."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import TOOLS, load_tool

TOOL = TOOLS / "merge_results.py"


def row(method, split, ppl, sparsity=0.1, seed=0, **kw):
    r = {"method": method, "sparsity": sparsity, "split": split, "perplexity": ppl}
    if method != "dense":
        r["seed"] = seed
    return r | kw


def test_latest_rows_renamed_and_eval_only_rows_completed(tmp_path, capsys):
    first = [row("dense", "tune", 36.7, 0.0, forward_tokens=0, achieved=0.0),
             row("dense", "test", 44.13, 0.0, forward_tokens=0, achieved=0.0),
             row("bonsai+lsq", "tune", 38.2, forward_tokens=524288, achieved=0.1),
             row("bonsai+lsq", "test", 46.6),  # eval-only: the tune row's model on the test windows
             row("flap+lsq", "test", 47.9, forward_tokens=540672, achieved=0.1)]
    second = [row("dense", "test", 44.13 * (1 + 1e-8), 0.0, forward_tokens=0, achieved=0.0),
              row("flap+lsq", "test", 47.2, forward_tokens=540672, achieved=0.1),  # a later run replaces it
              row("flap+lsq", "test", 53.6, 0.2, forward_tokens=507904, achieved=0.2),
              row("prior", "test", 55.0, forward_tokens=4608, achieved=0.1)]  # not asked for
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out.json"
    a.write_text(json.dumps(first))
    b.write_text(json.dumps(second))
    subprocess.run([sys.executable, str(TOOL), str(a), str(b), "--split", "test", "--methods",
                    "bonsai+lsq=bonsai.c16+lsq", "flap+lsq", "--out", str(out)], check=True)
    got = json.loads(out.read_text())
    assert [(r["method"], r["sparsity"], r["perplexity"]) for r in got] == [
        ("dense", 0.0, 44.13), ("bonsai.c16+lsq", 0.1, 46.6), ("flap+lsq", 0.1, 47.2), ("flap+lsq", 0.2, 53.6)]
    bonsai = got[1]
    assert bonsai["forward_tokens"] == 524288 and bonsai["achieved"] == 0.1
    assert "from the same model's row on the tune windows" in bonsai["note"]
    assert "note" not in got[2]


def test_refuses_mixed_windows_missing_methods_and_rows_it_cannot_complete():
    tool = load_tool("merge_results")
    dense = [row("dense", "test", 44.13, 0.0), row("dense", "test", 44.5, 0.0)]
    with pytest.raises(SystemExit, match="differ"):
        tool.merge(dense, "test", {"bonsai": "bonsai"})
    rows = [row("dense", "test", 44.13, 0.0), row("bonsai", "test", 50.0)]
    with pytest.raises(SystemExit, match="no test rows of \\['flap'\\]"):
        tool.merge(rows, "test", {"bonsai": "bonsai", "flap": "flap"})
    with pytest.raises(SystemExit, match="has no forward_tokens or achieved"):
        tool.merge(rows, "test", {"bonsai": "bonsai"})
    with pytest.raises(SystemExit, match="no dense row"):
        tool.merge(rows[1:], "test", {"bonsai": "bonsai"})


def test_two_names_for_one_model_keep_the_latest_row_and_the_latest_usable_twin():
    """Two methods given one name are one model: the later row wins. An eval-only row takes its
    forward tokens from the latest row on another split that has them, not from the first one."""
    tool = load_tool("merge_results")
    rows = [row("dense", "test", 44.13, 0.0),
            row("old", "tune", 38.3),  # no forward tokens: not a twin
            row("old", "test", 46.9, forward_tokens=1, achieved=0.1),
            row("new", "tune", 38.2, forward_tokens=524288, achieved=0.1),
            row("new", "test", 46.6)]  # eval-only, replaces "old"'s row of the same model
    got = tool.merge(rows, "test", tool.parse_names(["old=b", "new=b"]))
    assert [(r["method"], r["perplexity"], r["forward_tokens"]) for r in got[1:]] == [("b", 46.6, 524288)]
    same_split = [row("dense", "test", 44.13, 0.0), row("b", "test", 47.0, forward_tokens=7, achieved=0.1),
                  row("b", "test", 46.9)]  # an eval-only row replacing a full one on the same windows
    got = tool.merge(same_split, "test", {"b": "b"})[1]
    assert (got["perplexity"], got["forward_tokens"]) == (46.9, 7) and "test windows" in got["note"]


def test_bad_inputs_are_refused_in_one_line(tmp_path):
    tool = load_tool("merge_results")
    for given, match in ((["a="], "neither empty"), (["=b"], "neither empty"), (["a", "a=b"], "a given twice")):
        with pytest.raises(SystemExit, match=match):
            tool.parse_names(given)
    rows = [row("dense", "test", 44.13, 0.0, eval_skip=1037, eval_seqs=32),
            row("bonsai", "test", 50.0, forward_tokens=1, achieved=0.1, eval_skip=8, eval_seqs=32)]
    with pytest.raises(SystemExit, match="eval_skip 8 on the test windows, the dense row's is 1037"):
        tool.merge(rows, "test", {"bonsai": "bonsai"})
    bad = {"missing.json": None, "broken.json": "[{", "dict.json": "{}",
           "null.json": '[{"method": "x", "sparsity": 0.1, "perplexity": null}]', "rowless.json": '[{"method": "x"}]'}
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        run = subprocess.run([sys.executable, str(TOOL), str(tmp_path / name), "--split", "test",
                              "--methods", "x", "--out", str(tmp_path / "out.json")], capture_output=True, text=True)
        assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1, (name, run.stderr)
        assert name in run.stderr and not (tmp_path / "out.json").exists()
    assert "row 0 has no sparsity, perplexity" in run.stderr
