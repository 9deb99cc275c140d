"""The texts shipped in the package: found by name, checked by sha256, the default calibration."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from typer.testing import CliRunner

from lowmem_bonsai import texts
from lowmem_bonsai.cli import app
from lowmem_bonsai.data import read_text
from lowmem_bonsai.errors import UserError

from .conftest import make_tiny, write_word_tokenizer


def test_bundled_text_is_wikitext2_valid_with_its_attribution():
    path = texts.bundled_path("wikitext2-valid")
    assert path.is_relative_to(texts.TEXT_DIR)
    data = path.read_bytes()
    assert len(data) == 1_121_681
    assert hashlib.sha256(data).hexdigest() == texts.BUNDLED["wikitext2-valid"].sha256
    text = read_text("wikitext2-valid")
    assert text.startswith(" \n = Homarus gammarus = \n") and text.count("<unk>") > 1000
    note = (texts.TEXT_DIR / "README.md").read_text(encoding="utf-8")
    assert "CC BY-SA 3.0" in note and texts.BUNDLED["wikitext2-valid"].sha256 in note


def test_damaged_bundled_text_is_refused(tmp_path, monkeypatch):
    shutil.copy(texts.bundled_path("wikitext2-valid"), tmp_path / "wikitext2-valid.txt")
    with open(tmp_path / "wikitext2-valid.txt", "r+b") as f:
        f.seek(1000)
        f.write(b"X")
    monkeypatch.setattr(texts, "TEXT_DIR", tmp_path)
    monkeypatch.setattr(texts, "_VERIFIED", set())
    with pytest.raises(UserError, match="sha256 .* differs.*reinstall"):
        read_text("wikitext2-valid")
    (tmp_path / "wikitext2-valid.txt").unlink()
    with pytest.raises(UserError, match="missing from this install"):
        read_text("wikitext2-valid")


def test_paths_are_still_paths(tmp_path):
    own = tmp_path / "mine.txt"
    own.write_text("some words here", encoding="utf-8")
    assert texts.text_file(own) == own
    assert read_text(own) == "some words here"
    with pytest.raises(UserError, match="not found.*wikitext2-valid"):
        read_text(tmp_path / "wikitext2-vali")


def test_prune_calibrates_on_the_bundled_text_by_default_and_eval_names_it(tmp_path):
    model_dir = tmp_path / "m"
    make_tiny(model_dir, "llama-gqa-tied")
    write_word_tokenizer(model_dir, read_text("wikitext2-valid")[:40000])
    runner = CliRunner()
    res = runner.invoke(app, ["prune", str(model_dir), "--out", str(tmp_path / "o"), "--sparsity", "0.2",
                              "--seq-len", "32", "--calib-seqs", "2", "--masks-per-round", "4",
                              "--prune-frac", "0.2"])
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["settings"]["calib"] == "wikitext2-valid"
    res = runner.invoke(app, ["eval", str(tmp_path / "o"), "--data", "wikitext2-valid", "--seq-len", "32",
                              "--max-seqs", "3", "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "e.json").read_text())
    assert got["data"] == "wikitext2-valid" and got["tokens"] == 3 * 31
