"""tools/bench_quality.py keeps tuning apart from evaluation: with --split tune / test it refuses,
before any work, calibration that would reach into the tune windows (the repair's text included)."""

from __future__ import annotations

import sys

import pytest

from .conftest import load_tool, sample_words


class Evaluated(Exception):
    """Raised by the stand-in for evaluate: the run got past the checks to its first evaluation."""


@pytest.mark.parametrize("extra, refused", [
    ([], False),  # 4 windows of the masks' text, 2 of the repair's: before the tune windows
    (["calib_seqs=600"], True),  # the masks' windows reach them
    (["reconstruct_seqs=600"], False),  # no repair: its text is not read
    (["reconstruct_seqs=600", "--repairs", "lsq"], True),  # the repair's windows reach them
])
def test_calibration_reaching_the_tune_windows_is_refused(tmp_path, tiny_llama, monkeypatch, capsys,
                                                          extra, refused):
    tool = load_tool("bench_quality")
    text = tmp_path / "t.txt"
    text.write_text(sample_words(), encoding="utf-8")
    n_windows = len(tool.tokenize_file(tool.load_tokenizer(tiny_llama), text)) // 16
    assert 100 < n_windows < 600  # the last 2 x 4 windows are tune and test; 600 windows reach them

    def evaluate(**kw):
        raise Evaluated(kw["skip"])

    monkeypatch.setattr(tool, "evaluate", evaluate)
    base = ["bench_quality.py", "--model", str(tiny_llama), "--out", str(tmp_path / "o"), "--data", str(text),
            "--split", "test", "--eval-seq-len", "16", "--eval-seqs", "4", "--methods", "bonsai",
            "--set", "seq_len=16", "calib_seqs=4", "prior_seqs=0", "reconstruct=none", "reconstruct_seqs=2",
            "reconstruct_seq_len=16"]
    monkeypatch.setattr(sys, "argv", base + extra)  # --set's further values, then maybe --repairs
    if refused:
        with pytest.raises(SystemExit) as e:
            tool.main()
        assert e.value.code == 2 and "reaches into the tune windows" in capsys.readouterr().err
        assert not (tmp_path / "o" / "results.json").exists()
    else:
        with pytest.raises(Evaluated) as e:
            tool.main()
        assert e.value.args[0] == n_windows - 4  # the dense row on the test windows, the last 4
