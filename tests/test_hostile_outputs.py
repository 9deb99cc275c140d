"""Odd or unwritable outputs, tampered progress, crashes and concurrent prunes.

Issue 14, class 6: an output that cannot be put in place is refused before any work, in one line.
Class 7: a damaged OUT.partial/state.json is one line; a crash that is not a user error leaves
either nothing (a plain rerun works) or progress with a word on how to continue; two prunes into
one --out: the second is told which process holds the lock, and a dead process's lock is taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowmem_bonsai.method import prune as prune_module
from lowmem_bonsai.cli import app
from lowmem_bonsai.pipeline import lock_path, prune_model, work_dir
from lowmem_bonsai.profiles import load_profile

from .conftest import byte_level_vocab, make_tiny, mount_tmpfs, refused, write_gguf

PROFILE = """# lowmem-bonsai prune M --out O --profile THIS.toml
compute_dtype = "float32"
masks_per_round = 4
wave_masks = 2
calib_seqs = 2
seq_len = 16
prune_frac = 0.2
align = 8
"""


@pytest.fixture
def profile(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(PROFILE)
    return path


def prune(model, out, calib, profile, *extra):
    return CliRunner().invoke(app, ["prune", str(model), "--out", str(out), "--calib", str(calib),
                                    "--profile", str(profile), "--sparsity", "0.3", "--seed", "1",
                                    *map(str, extra)])


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- class 6: outputs that cannot be put in place ---------------------------------------------

def _symlink_to_folder(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    return tmp_path / "link", "is a symbolic link"


def _under_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    return tmp_path / "file.txt" / "sub" / "out", f"{tmp_path / 'file.txt'} is not a folder"


OUTS = {
    "dot": (lambda tmp_path: (Path("."), "names the current or a parent folder")),
    "dotdot": (lambda tmp_path: (tmp_path / "a" / "..", "names the current or a parent folder")),
    "symlink to a folder": _symlink_to_folder,
    "under a file": _under_a_file,
    "the current folder's parent": (lambda tmp_path: (tmp_path.parent.parent, "would replace the current "
                                                      "folder")),
}


@pytest.mark.parametrize("case", sorted(OUTS))
@pytest.mark.parametrize("command", ["prune", "import-gguf", "export-gguf"])
def test_impossible_out_is_refused_before_work(tmp_path, tiny_llama, sample_text, profile, monkeypatch,
                                               case, command):
    monkeypatch.chdir(tmp_path / "m")  # "the current folder" is the model's copy
    out, words = OUTS[case](tmp_path)
    before = leftovers(tmp_path)
    if command == "prune":
        res = prune(tiny_llama, out, sample_text, profile, "--force")
    elif command == "import-gguf":
        res = CliRunner().invoke(app, ["import-gguf", str(write_gguf(tmp_path / "t.gguf")), "--out",
                                       str(out), "--force"])
        before.append("t.gguf")
    else:
        res = CliRunner().invoke(app, ["export-gguf", str(tiny_llama), "--out", str(out), "--force"])
    refused(res, words)
    assert leftovers(tmp_path) == sorted(before)
    assert (tiny_llama / "config.json").is_file()


@pytest.mark.parametrize("command", ["prune", "export-gguf"])
def test_out_that_would_replace_the_input_is_refused(tmp_path, tiny_llama, sample_text, profile, command):
    if command == "prune":
        res = prune(tiny_llama, tiny_llama, sample_text, profile, "--force")
    else:
        res = CliRunner().invoke(app, ["export-gguf", str(tiny_llama), "--out", str(tiny_llama), "--force"])
    refused(res, f"would replace the input {tiny_llama}")
    assert (tiny_llama / "config.json").is_file() and (tiny_llama / "model.safetensors").is_file()


@pytest.mark.parametrize("command, name", [("eval --json", "config.json"), ("eval --json", "tokenizer.json"),
                                           ("export-gguf", "model.safetensors")])
def test_out_that_would_replace_a_file_of_the_input_is_refused(tiny_llama, sample_text, command, name):
    """--force replaces what --out names; never a file the command reads (the model's own weights)."""
    target = tiny_llama / name
    before = target.read_bytes()
    if command == "export-gguf":
        res = CliRunner().invoke(app, ["export-gguf", str(tiny_llama), "--out", str(target), "--force"])
    else:
        res = CliRunner().invoke(app, ["eval", str(tiny_llama), "--data", str(sample_text), "--seq-len", "16",
                                       "--json", str(target)])
    refused(res, f"would replace the input {target}")
    assert target.read_bytes() == before


def test_eval_json_onto_its_own_text_is_refused(tiny_llama, tmp_path, sample_text):
    text = tmp_path / "text.txt"
    shutil.copy(sample_text, text)
    res = CliRunner().invoke(app, ["eval", str(tiny_llama), "--data", str(text), "--seq-len", "16",
                                   "--json", str(text)])
    refused(res, f"would replace the input {text}")
    assert text.read_bytes() == Path(sample_text).read_bytes()


def test_outputs_inside_the_model_folder_may_be_written_twice(tmp_path, tiny_llama, sample_text, profile):
    """Only the files a command reads are protected: its own earlier outputs there are not."""
    for _ in range(2):
        res = CliRunner().invoke(app, ["eval", str(tiny_llama), "--data", str(sample_text), "--seq-len", "16",
                                       "--max-seqs", "1", "--json", str(tiny_llama / "result.json")])
        assert res.exit_code == 0, res.output
        res = prune(tiny_llama, tiny_llama / "pruned", sample_text, profile, "--force")
        assert res.exit_code == 0, res.output
    assert json.loads((tiny_llama / "result.json").read_text())["perplexity"] > 0
    assert (tiny_llama / "pruned" / "plan.json").is_file()


def test_export_into_the_model_folder_twice(tmp_path):
    model = tmp_path / "m"  # a byte-level BPE tokenizer: llama.cpp's vocabularies need one
    tok, tokens, _, _ = byte_level_vocab()
    make_tiny(model, "llama-gqa-tied", vocab_size=len(tokens))
    tok.save(str(model / "tokenizer.json"))
    for _ in range(2):
        res = CliRunner().invoke(app, ["export-gguf", str(model), "--out", str(model / "m.gguf"), "--type",
                                       "f32", "--force"])
        assert res.exit_code == 0, res.output
    assert (model / "m.gguf").read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("which", ["partial is a file", "lock is a folder"])
def test_work_folder_or_lock_of_the_wrong_kind_is_refused(tmp_path, tiny_llama, sample_text, profile, which):
    out = tmp_path / "out"
    if which == "partial is a file":
        work_dir(out).write_text("mine")
        res, words = prune(tiny_llama, out, sample_text, profile, "--force"), f"{work_dir(out)}: is a file"
        assert work_dir(out).read_text() == "mine"
    else:
        lock_path(out).mkdir()
        res, words = prune(tiny_llama, out, sample_text, profile, "--resume"), f"{lock_path(out)}: is a folder"
        assert lock_path(out).is_dir()
    refused(res, words)
    assert not out.exists()


def test_existing_out_is_refused_before_the_text_is_read(tmp_path, tiny_llama, sample_text, profile):
    """A text too short for the profile's windows warns when it is read: the refusal comes first,
    alone on its line."""
    short = tmp_path / "short.txt"
    short.write_text(" ".join(Path(sample_text).read_text().split()[:40]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    res = subprocess.run([sys.executable, "-m", "lowmem_bonsai.cli", "prune", str(tiny_llama), "--out", str(out),
                          "--calib", str(short), "--profile", str(profile), "--calib-seqs", "64"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == f"error: {out}: folder exists and is not empty; pass --force to replace it"
    assert (out / "mine.txt").read_text() == "kept"


@pytest.fixture(params=["read-only mount", "no permission"])
def unwritable(request, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if request.param == "read-only mount":
        mount_tmpfs(request, folder, "ro,size=1M", why="mounting a read-only tmpfs needs root")
        return folder, "is on a read-only file system"
    if os.geteuid() == 0:
        pytest.skip("root writes into a folder without write permission")
    folder.chmod(0o555)
    request.addfinalizer(lambda: folder.chmod(0o755))
    return folder, "is not writable"


@pytest.mark.parametrize("command", ["prune", "import-gguf", "export-gguf", "eval --json"])
def test_unwritable_out_is_refused_before_work(tmp_path, tiny_llama, sample_text, profile, unwritable,
                                               command):
    folder, words = unwritable
    out = folder / "deeper" / "out"
    if command == "prune":
        res = prune(tiny_llama, out, sample_text, profile)
    elif command == "import-gguf":
        res = CliRunner().invoke(app, ["import-gguf", str(write_gguf(tmp_path / "t.gguf")), "--out", str(out)])
    elif command == "export-gguf":
        res = CliRunner().invoke(app, ["export-gguf", str(tiny_llama), "--out", str(out)])
    else:
        res = CliRunner().invoke(app, ["eval", str(tiny_llama), "--data", str(sample_text), "--seq-len",
                                       "16", "--json", str(out)])
    refused(res, f"{out}: cannot be written: {folder} {words}")
    assert leftovers(folder) == []


def test_eval_json_into_a_folder_is_refused_before_work(tmp_path, tiny_llama, sample_text):
    folder = tmp_path / "results"  # (tmp_path holds the model: that is refused as its input)
    folder.mkdir()
    res = CliRunner().invoke(app, ["eval", str(tiny_llama), "--data", str(sample_text), "--seq-len", "16",
                                   "--json", str(folder)])
    refused(res, f"{folder}: is a folder; --json names the file to write")


# --- class 7: saved progress that was tampered with ----------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory, _tiny_llama):
    """A prune stopped by Ctrl-C after round 1: (model, out, calib, profile, state.json text)."""
    from .conftest import sample_words

    root = tmp_path_factory.mktemp("saved")
    model = shutil.copytree(_tiny_llama, root / "m")
    calib = root / "calib.txt"
    calib.write_text(sample_words())
    profile = root / "p.toml"
    profile.write_text(PROFILE)
    out = root / "out"

    def stop_after_round_1(stage, done, total):
        if stage == "round" and done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune_model(model_dir=model, out_dir=out, sparsity=0.3, profile=load_profile(profile),
                    calib=calib, seed=1, progress=stop_after_round_1)
    return model, out, calib, profile, (work_dir(out) / "state.json").read_text()


def _tamper(edit):
    def apply(text):
        data = json.loads(text)
        edit(data)
        return json.dumps(data)
    return apply


TAMPERED = {
    "not json": (lambda t: t[: len(t) // 2], "cannot read the saved progress"),
    "nested": (lambda t: "[" * 100_000 + "]" * 100_000, "cannot read the saved progress"),
    "a list": (lambda t: "[]", "the saved progress is damaged (not a JSON object)"),
    "rounds a string": (_tamper(lambda d: d.update(rounds="many")), "'rounds' must be a list of round reports"),
    "round report of strings": (_tamper(lambda d: d["rounds"][0].update(params_after="x")),
                                "'rounds' must be a list"),
    "unknown round field": (_tamper(lambda d: d["rounds"][0].update(surprise=1)), "'rounds' must be a list"),
    "plan index out of range": (_tamper(lambda d: d["plan"]["layers"][0].update(channels=[0, 1, 999])),
                                "plan layer 0: channels must be distinct sorted indices below 96"),
    "plan a number": (_tamper(lambda d: d.update(plan=3)), "'plan' must be an object or null"),
    "plan without rounds": (_tamper(lambda d: d.update(rounds=[])), "'plan' and 'rounds' disagree"),
    "waves of strings": (_tamper(lambda d: d.update(waves={"0": ["a"]}, round_start=None)),
                         "'waves' must map wave numbers to lists of losses"),
    "generator garbage": (_tamper(lambda d: d.update(gen_after="bm90IGEgc3RhdGU=")),
                          "'gen_after' is not a generator state"),
    "round_start garbage": (_tamper(lambda d: d.update(round_start={"round": 2, "gen": 5})),
                            "'round_start' must be null or a round number"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_state_is_one_line_and_kept(saved, case):
    model, out, calib, profile, text = saved
    state = work_dir(out) / "state.json"
    edit, words = TAMPERED[case]
    state.write_text(edit(text))
    try:
        refused(prune(model, out, calib, profile, "--resume"), str(state), words)
        assert state.read_text() == edit(text)  # kept for the user to look at, not overwritten
        assert not out.exists()
    finally:
        state.write_text(text)


def test_untampered_state_resumes(saved, tmp_path):
    model, out, calib, profile, text = saved
    copy_out = tmp_path / "out"
    shutil.copytree(work_dir(out), work_dir(copy_out))
    res = prune(model, copy_out, calib, profile, "--resume")
    assert res.exit_code == 0, res.output
    assert (copy_out / "plan.json").is_file() and not work_dir(copy_out).exists()


# --- class 7: crashes that are not user errors ------------------------------------------------

def _crash_in(monkeypatch, name: str, after: int):
    real, calls = getattr(prune_module, name), []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise RuntimeError("a bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(prune_module, name, crash)


def test_crash_before_any_progress_does_not_block_a_plain_rerun(tmp_path, tiny_llama, sample_text, profile,
                                                                 monkeypatch):
    out = tmp_path / "out"
    _crash_in(monkeypatch, "streamed_nll", 0)
    res = prune(tiny_llama, out, sample_text, profile)
    assert isinstance(res.exception, RuntimeError)  # a bug keeps its traceback
    assert not work_dir(out).exists() and not lock_path(out).exists()
    monkeypatch.undo()
    res = prune(tiny_llama, out, sample_text, profile)
    assert res.exit_code == 0, res.output


def test_crash_after_progress_says_how_to_continue(tmp_path, tiny_llama, sample_text, profile, monkeypatch):
    out = tmp_path / "out"
    _crash_in(monkeypatch, "streamed_nll", 3)  # the prior pass and the waves of round 1 are scored
    res = prune(tiny_llama, out, sample_text, profile)
    assert isinstance(res.exception, RuntimeError)
    assert (f"progress is saved in {work_dir(out)}: rerun with --resume to continue, or with --force "
            "to start over") in res.output
    assert not lock_path(out).exists()
    monkeypatch.undo()
    res = prune(tiny_llama, out, sample_text, profile, "--resume")
    assert res.exit_code == 0, res.output


def test_killed_before_any_progress_does_not_block_a_plain_rerun(tmp_path, tiny_llama, sample_text, profile):
    out = tmp_path / "out"
    work_dir(out).mkdir()  # what a SIGKILL right after the start leaves
    (work_dir(out) / "state.json").write_text(json.dumps({"version": 1, "rounds": [], "waves": {}}))
    res = prune(tiny_llama, out, sample_text, profile)
    assert res.exit_code == 0, res.output


# --- class 7: one prune per --out ----------------------------------------------------------------

def test_second_prune_into_the_same_out_names_the_first(tmp_path, tiny_llama, sample_text, profile):
    out = tmp_path / "out"
    lock = lock_path(out)
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started": "2026-01-02 03:04:05 UTC"}))
    for extra in ((), ("--resume",), ("--force",)):
        refused(prune(tiny_llama, out, sample_text, profile, *extra),
                f"{lock}: another prune into {out} is running (pid {os.getpid()} on "
                f"{socket.gethostname()}, started 2026-01-02 03:04:05 UTC)")
    assert lock.exists() and not work_dir(out).exists()


def test_lock_of_a_dead_prune_is_taken_over(tmp_path, tiny_llama, sample_text, profile):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                          "started": "2026-01-02 03:04:05 UTC"}))
    res = prune(tiny_llama, out, sample_text, profile)
    assert res.exit_code == 0, res.output
    assert leftovers(tmp_path).count("out.lock") == 0 and (out / "plan.json").is_file()
