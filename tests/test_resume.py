"""A prune killed at random points and resumed ends with exactly the uninterrupted run's output."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import make_tiny, write_word_tokenizer

PROFILE = """# lowmem-bonsai prune M --out O --profile THIS.toml
masks_per_round = 16
wave_masks = 2
calib_seqs = 4
seq_len = 32
prune_frac = 0.1
align = 8
# under what any test machine has free: a budget cut to the free memory would differ between runs
# (the plan records the budget it ran with)
memory_gb = 4.0
"""


def prune_cmd(model_dir: Path, out: Path, profile: Path, calib: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lowmem_bonsai.cli", "prune", str(model_dir), "--out", str(out),
            "--sparsity", "0.4", "--profile", str(profile), "--calib", str(calib), "--seed", "7", *extra]


@pytest.fixture
def setup(tmp_path, sample_text):
    model_dir = tmp_path / "m"
    make_tiny(model_dir, "llama-gqa-tied", layers=4, intermediate_size=256, num_attention_heads=8,
              num_key_value_heads=4)
    write_word_tokenizer(model_dir, sample_text.read_text())
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)
    return model_dir, profile, sample_text


def outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("plan.json", "model.safetensors", "config.json")}


def wait_for(cond, timeout: float = 300.0) -> bool:  # generous: a loaded 2-core machine
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_sigkill_at_random_points_then_resume_gives_identical_output(tmp_path, setup):
    model_dir, profile, calib = setup
    ref = tmp_path / "ref"
    subprocess.run(prune_cmd(model_dir, ref, profile, calib), check=True, capture_output=True)

    out = tmp_path / "out"
    work = tmp_path / "out.partial"
    state = work / "state.json"
    rng = random.Random(0)
    kills = []
    # Kill points: after a random number of checkpoints (so inside a block, between waves or
    # rounds), and once as soon as the output shards are being written.
    for point in ["ckpt", "ckpt", "ckpt", "ckpt", "ckpt", "write", "end"]:
        args = prune_cmd(model_dir, out, profile, calib, *(["--resume"] if state.is_file() else []))
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if point == "end":
            assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
            break
        if point == "write":
            hit = wait_for(lambda: (work / "out").is_dir() or proc.poll() is not None)
        else:
            seen = state.stat().st_mtime_ns if state.is_file() else 0
            need = rng.randint(1, 3)

            def advanced() -> bool:
                nonlocal seen, need
                if proc.poll() is not None:
                    return True
                if state.is_file() and state.stat().st_mtime_ns != seen:
                    seen, need = state.stat().st_mtime_ns, need - 1
                return need <= 0
            hit = wait_for(advanced)
            time.sleep(rng.uniform(0, 0.2))  # land inside the next block's work
        assert hit
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append(point)
            assert not (out / "plan.json").exists()  # nothing that looks finished
        elif proc.returncode == 0:
            break
    assert len(kills) >= 5, kills
    assert outputs(out) == outputs(ref)
    assert not work.exists()


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, setup):
    model_dir, profile, calib = setup
    out = tmp_path / "out"
    # A test runner started in the background (no job control) inherits SIGINT ignored, and Python
    # then never raises KeyboardInterrupt: give the child the default disposition back.
    proc = subprocess.Popen(prune_cmd(model_dir, out, profile, calib), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state = tmp_path / "out.partial" / "state.json"
    deadline = time.time() + 60

    def scored() -> bool:  # a Ctrl-C before the first scored wave leaves nothing to resume
        try:
            data = json.loads(state.read_text())
            return bool(data["waves"] or data["rounds"])
        except (OSError, ValueError, KeyError):
            return False
    # Interrupt as soon as the prune has saved its first wave, early in round 1.
    while time.time() < deadline and not scored() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"--resume" in err and b"Traceback" not in err
    again = subprocess.run(prune_cmd(model_dir, out, profile, calib), capture_output=True)
    assert again.returncode == 2 and b"--resume" in again.stderr  # a plain rerun is refused
    done = subprocess.run(prune_cmd(model_dir, out, profile, calib, "--resume"), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert (out / "plan.json").is_file()
