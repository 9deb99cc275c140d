"""One command from a GGUF: prune and estimate take a .gguf as MODEL (imported into OUT.partial/)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from lowmem_bonsai.cli import app
from lowmem_bonsai.estimate import estimate
from lowmem_bonsai.llamacpp.to_gguf import export_gguf
from lowmem_bonsai.llamacpp.from_gguf import import_gguf
from lowmem_bonsai.pipeline import prune_model, work_dir
from lowmem_bonsai.profiles import Profile

from .test_gguf_export import tiny

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python not installed")

PROFILE = Profile(name="t", masks_per_round=4, calib_seqs=2, seq_len=32, prune_frac=0.2, align=8)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("g")
    tiny(root / "m", "llama-gqa-tied")
    return export_gguf(model_dir=root / "m", out=root / "m.gguf", type="f16")


def test_prune_from_a_gguf_equals_prune_of_its_import(tmp_path, gguf_file, sample_text):
    runner = CliRunner()
    out = tmp_path / "o"
    res = runner.invoke(app, ["prune", str(gguf_file), "--out", str(out), "--sparsity", "0.4",
                              "--calib", str(sample_text), "--seq-len", "32", "--calib-seqs", "2",
                              "--masks-per-round", "4", "--prune-frac", "0.2", "--memory", "4G"])
    assert res.exit_code == 0, res.output
    assert not work_dir(out).exists()  # the import went with the rest of OUT.partial
    plan = json.loads((out / "plan.json").read_text())
    assert plan["source"] == str(gguf_file) and plan["settings"]["imported_from"] == str(gguf_file)
    # the same prune of the GGUF imported by hand decides the same
    src = import_gguf(gguf_path=gguf_file, out_dir=tmp_path / "imported")
    ref = tmp_path / "ref"
    res = runner.invoke(app, ["prune", str(src), "--out", str(ref), "--sparsity", "0.4",
                              "--calib", str(sample_text), "--seq-len", "32", "--calib-seqs", "2",
                              "--masks-per-round", "4", "--prune-frac", "0.2", "--memory", "4G"])
    assert res.exit_code == 0, res.output
    assert json.loads((ref / "plan.json").read_text())["layers"] == plan["layers"]
    assert (ref / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_interrupted_prune_from_a_gguf_resumes_from_its_import(tmp_path, gguf_file, sample_text):
    ref = prune_model(model_dir=gguf_file, out_dir=tmp_path / "ref", sparsity=0.4, profile=PROFILE,
                      calib=sample_text)

    def stop_after_a_round(stage, done, total):
        if stage == "round" and done >= 1:
            raise KeyboardInterrupt

    out = tmp_path / "o"
    with pytest.raises(KeyboardInterrupt):
        prune_model(model_dir=gguf_file, out_dir=out, sparsity=0.4, profile=PROFILE, calib=sample_text,
                    progress=stop_after_a_round)
    assert (work_dir(out) / "source" / "config.json").is_file() and not out.exists()
    got = prune_model(model_dir=gguf_file, out_dir=out, sparsity=0.4, profile=PROFILE, calib=sample_text,
                      resume=True)
    assert got["layers"] == ref["layers"] and not work_dir(out).exists()


def test_a_refused_prune_from_a_gguf_leaves_nothing(tmp_path, gguf_file, sample_text):
    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["prune", str(gguf_file), "--out", str(out), "--calib", str(sample_text),
                                   "--memory", "100M"])
    assert res.exit_code == 2 and "too small" in res.output, res.output
    assert not out.exists() and not work_dir(out).exists()
    res = CliRunner().invoke(app, ["prune", str(gguf_file), "--out", str(out), "--calib", str(sample_text),
                                   "--sparsity", "0.7", "--min-width", "0.5"])
    assert res.exit_code == 2 and "min_width = 0.5" in res.output, res.output  # before the import
    assert not out.exists() and not work_dir(out).exists()
    (tmp_path / "bad.gguf").write_bytes(b"GGUFnope")
    res = CliRunner().invoke(app, ["prune", str(tmp_path / "bad.gguf"), "--out", str(out)])
    assert res.exit_code == 2 and "bad.gguf" in res.output, res.output
    assert not out.exists() and not work_dir(out).exists()


def test_estimate_of_a_gguf_reads_its_metadata_and_counts_the_import(tmp_path, gguf_file):
    from_gguf = estimate(model_dir=gguf_file, profile=PROFILE, sparsity=0.4, measure_seconds=0.05)
    src = import_gguf(gguf_path=gguf_file, out_dir=tmp_path / "imported")
    from_dir = estimate(model_dir=src, profile=PROFILE, sparsity=0.4, measure_seconds=0.05)
    for key in ("params_total", "params_blocks", "rounds", "disk_output_gb",
                "forward_tokens_per_round", "forward_tflops_total"):
        assert from_gguf[key] == from_dir[key], key
    # the same plan, plus the import that comes first (one tensor at a time)
    imported = from_gguf["memory"].pop("import_gb")
    assert from_dir["memory"].pop("import_gb") == 0 and imported > 0
    assert from_gguf["memory"].pop("total_gb") == max(from_dir["memory"].pop("total_gb"), imported)
    assert from_gguf["memory"] == from_dir["memory"]
    assert from_dir["disk_import_gb"] == 0
    assert from_gguf["disk_import_gb"] == pytest.approx(from_gguf["params_total"] * 2 / 1024**3)
    res = CliRunner().invoke(app, ["estimate", str(gguf_file), "--sparsity", "0.4", "--memory", "4G"])
    assert res.exit_code == 0, res.output
    assert "for the GGUF's import (OUT.partial/source" in res.output
    assert not list(tmp_path.glob("*.partial"))  # nothing imported by estimate
