"""One prune over two ranks on 127.0.0.1: the single process's plan and shards, faults named, resume.

The ranks are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
environment), as plain subprocesses, so the tests need no launcher and stay on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .conftest import edit_config, make_tiny, sample_words, write_word_tokenizer

TIMEOUT_S = 5  # the profile's dist_timeout_s: how long a rank waits for a silent peer

PROFILE = f"""# lowmem-bonsai prune M --out O --profile THIS.toml
masks_per_round = 16
wave_masks = 2
calib_seqs = 4
seq_len = 32
prune_frac = 0.1
align = 8
threads = 1
# under what any test machine has free: a budget cut to the free memory would differ between the
# processes' plans (the plan records the budget it ran with)
memory_gb = 4.0
dist_timeout_s = {TIMEOUT_S}.0
# pinned: "auto" picks the dtype by a short matmul probe in each process, and on a loaded machine
# one process may pick bfloat16 while another picks float32 (a different plan)
compute_dtype = "float32"
"""


def prune_args(model_dir: Path, out: Path, profile: Path, calib: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lowmem_bonsai", "prune", str(model_dir), "--out", str(out),
            "--sparsity", "0.3", "--profile", str(profile), "--calib", str(calib), "--seed", "7", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args_of_rank, world: int = 2) -> list[subprocess.Popen]:
    """``world`` processes of one job, as torchrun would start them on this machine."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(args_of_rank(rank), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def one_error_line(stderr: str, *words: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def outputs(out: Path) -> dict[str, object]:
    """The plan and the written files."""
    plan = json.loads((out / "plan.json").read_text())
    assert "memory_budget" not in plan["settings"]  # this machine's free memory is not the plan's
    return {"plan": plan, **{name: (out / name).read_bytes() for name in ("model.safetensors", "config.json")}}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny model, a profile, a text and the single process's output (run once)."""
    d = tmp_path_factory.mktemp("dist")
    model_dir = d / "m"
    make_tiny(model_dir, "llama-gqa-tied", layers=4, intermediate_size=256, num_attention_heads=8,
              num_key_value_heads=4)
    text = d / "calib.txt"
    text.write_text(sample_words(), encoding="utf-8")
    write_word_tokenizer(model_dir, text.read_text())
    profile = d / "p.toml"
    profile.write_text(PROFILE)
    ref = d / "ref"
    subprocess.run(prune_args(model_dir, ref, profile, text), check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return model_dir, profile, text, ref


def test_two_ranks_give_the_single_process_plan_and_shards(tmp_path, job):
    model_dir, profile, text, ref = job
    out = tmp_path / "out"
    procs = start_ranks(lambda rank: prune_args(model_dir, out, profile, text))
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert "rank 1 of 2: done" in results[1][0]
    assert outputs(out) == outputs(ref)
    report = json.loads((out / "report.json").read_text())
    single = json.loads((ref / "report.json").read_text())
    assert report["ranks"] == 2 and single["ranks"] == 1
    per_rank = report["forward_tokens_per_rank"]
    # Each rank passed half the calibration windows and half the waves of every round.
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1] > 0
    assert sum(per_rank) == report["forward_tokens"] == single["forward_tokens_per_rank"][0]
    assert not (tmp_path / "out.partial").exists()


def one_process_and_two_ranks(model_dir: Path, profile: Path, text: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The same prune by one process (``ref``) and by two ranks (``out``); their plans are equal."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(prune_args(model_dir, ref, profile, text), check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    procs = start_ranks(lambda rank: prune_args(model_dir, out, profile, text))
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert json.loads((out / "plan.json").read_text())["layers"] == json.loads((ref / "plan.json").read_text())["layers"]
    return ref, out


def test_a_round_of_one_wave_is_shared_by_both_ranks(tmp_path, job):
    """A large model's round is often a single wave: each rank scores half of its masks, and the
    plan is the single process's (the halves' losses agree with the whole batch's to rounding)."""
    model_dir, _, text, _ = job
    profile = tmp_path / "one-wave.toml"
    profile.write_text(PROFILE.replace("wave_masks = 2", "wave_masks = 16"))
    ref, out = one_process_and_two_ranks(model_dir, profile, text, tmp_path)
    report = json.loads((out / "report.json").read_text())
    single = json.loads((ref / "report.json").read_text())
    per_rank = report["forward_tokens_per_rank"]
    assert per_rank[0] == per_rank[1] > 0 and sum(per_rank) == single["forward_tokens"]
    for mine, theirs in zip(report["rounds"], single["rounds"]):
        assert mine["mask_loss_mean"] == pytest.approx(theirs["mask_loss_mean"], rel=1e-6)


@pytest.mark.parametrize("extra", ["", 'reconstruct_target = "stream"\nreconstruct_reselect = true\n'
                                   'reconstruct_reselect_heads = true\n', 'reconstruct_position_power = 1\n',
                                   'reconstruct_target = "stream"\nreconstruct_gap_weight = 0.5\n'])
def test_reconstruction_shares_its_windows_and_matches_one_process(tmp_path, job, extra):
    """lsq over 2 ranks: each streams half the windows and the moments are summed before every
    solve, so the repaired weights equal one process's up to the order of the sums (a rank that
    kept only its own half would solve a different system). With reselect, the ranks choose the
    channels from the summed moments too: the same plan as one process. With a position power, each
    rank's moments carry the weighted token count too, and the sums still solve one system. With
    the gap weighting each rank weighs its own windows' tokens by the first repair's losses there,
    scaled by the mean over both ranks' tokens, so the second repair is one process's too."""
    from safetensors.torch import load_file

    model_dir, _, text, _ = job
    profile = tmp_path / "lsq.toml"
    profile.write_text(PROFILE + 'reconstruct = "lsq"\nreconstruct_seqs = 8\nreconstruct_seq_len = 32\n' + extra)
    ref, out = one_process_and_two_ranks(model_dir, profile, text, tmp_path)
    assert json.loads((out / "plan.json").read_text())["layers"] == json.loads((ref / "plan.json").read_text())["layers"]
    mine, theirs = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert mine.keys() == theirs.keys() and "model.layers.0.mlp.down_proj.bias" in mine
    for name, t in theirs.items():  # an fp32 Gram summed in another order, then a ridge solve
        assert (mine[name] - t).abs().max() <= 1e-3 * t.abs().max(), name
    from lowmem_bonsai.engine.forward import streamed_nll
    from lowmem_bonsai.model.checkpoint import Checkpoint

    ids = torch.randint(0, 211, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(streamed_nll(Checkpoint(out), ids), streamed_nll(Checkpoint(ref), ids),
                               rtol=1e-5, atol=0)
    assert not (tmp_path / "out.partial").exists()
    repairs = json.loads((out / "report.json").read_text())["reconstruction"]["repairs"]
    assert repairs == (2 if "gap_weight" in extra else 1)


def test_a_repair_between_the_rounds_is_the_same_on_every_rank(tmp_path, job, monkeypatch):
    """reconstruct_in_rounds over 2 ranks: every rank repairs the plan before each round after the
    first (rank 1 into a temporary folder of its own, removed at the end) and scores it, so the
    plan is the single process's."""
    from safetensors.torch import load_file

    model_dir, _, text, _ = job
    profile = tmp_path / "in-rounds.toml"
    # float32: the ranks' other order of summing the moments moves the repair by rounding, and the
    # losses of the model it repairs by fp32's rounding, not by a measured dtype's (fp16 here)
    profile.write_text(PROFILE + 'reconstruct = "lsq"\nreconstruct_seqs = 8\nreconstruct_seq_len = 32\n'
                       'reconstruct_in_rounds = true\n')  # PROFILE pins compute_dtype
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # where rank 1 keeps its copy
    ref, out = one_process_and_two_ranks(model_dir, profile, text, tmp_path)
    report = json.loads((out / "report.json").read_text())
    single = json.loads((ref / "report.json").read_text())
    assert [r["repair_tokens"] for r in report["rounds"]] == [0] + [2 * 8 * 32] * (len(report["rounds"]) - 1)
    assert len(report["rounds"]) >= 3
    for mine, theirs in zip(report["rounds"], single["rounds"]):
        assert mine["calib_loss"] == pytest.approx(theirs["calib_loss"], rel=1e-6)
    per_rank = report["forward_tokens_per_rank"]
    assert per_rank[0] == per_rank[1] and sum(per_rank) == single["forward_tokens_per_rank"][0]
    mine, theirs = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    for name, t in theirs.items():
        assert (mine[name] - t).abs().max() <= 1e-3 * t.abs().max(), name
    assert not list(scratch.iterdir()) and not (tmp_path / "out.partial").exists()


SAME_FILES = """
import sys
from pathlib import Path
from lowmem_bonsai.engine.ranks import join
from lowmem_bonsai.method.round_repair import same_files
ranks = join(timeout_s=30, device="cpu")
folder = Path(sys.argv[1]) / f"rank{ranks.rank}"
folder.mkdir()
files = [folder / "layer-0000.safetensors", folder / "layer-0001.safetensors"]
files[0].write_bytes(b"the same on every rank")
files[1].write_bytes(f"rank {ranks.rank}'s rounding".encode())
same_files(files, ranks, what="the test")
print([p.read_bytes().decode() for p in files])
ranks.close()
"""


def test_a_rank_whose_repair_differs_takes_rank_0s_bytes(tmp_path):
    procs = start_ranks(lambda rank: [sys.executable, "-c", SAME_FILES, str(tmp_path)])
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert [r[0].strip() for r in results] == [str(["the same on every rank", "rank 0's rounding"])] * 2


def wait_mid_round(state: Path, proc: subprocess.Popen) -> None:
    """Until rank 0 has saved some waves of a round after the first."""
    def mid_round() -> bool:
        try:
            data = json.loads(state.read_text())
        except (OSError, ValueError):
            return False
        return len(data["rounds"]) >= 1 and bool(data["waves"])
    deadline = time.time() + 240
    while time.time() < deadline and not mid_round() and proc.poll() is None:
        time.sleep(0.01)
    assert mid_round(), proc.communicate()


def test_a_killed_rank_is_named_within_the_timeout_and_one_rank_resumes_to_the_same_plan(tmp_path, job):
    model_dir, profile, text, ref = job
    out = tmp_path / "out"
    state = tmp_path / "out.partial" / "state.json"
    procs = start_ranks(lambda rank: prune_args(model_dir, out, profile, text))
    wait_mid_round(state, procs[0])
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    _, err = procs[0].communicate(timeout=TIMEOUT_S + 30)
    stopped = time.time() - killed
    procs[1].wait()
    assert procs[0].returncode == 3, err
    line = one_error_line(err, "rank 1 stopped answering", "--resume")
    assert stopped < TIMEOUT_S + 10, (stopped, line)  # a dead peer is noticed at the next exchange
    assert not (out / "plan.json").exists() and state.is_file()

    # A plain single process continues the job and ends with the single process's output.
    res = subprocess.run(prune_args(model_dir, out, profile, text, "--resume"), capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert outputs(out) == outputs(ref)


def test_a_hung_rank_is_named_after_the_timeout(tmp_path, job):
    model_dir, profile, text, _ = job
    out = tmp_path / "out"
    state = tmp_path / "out.partial" / "state.json"
    procs = start_ranks(lambda rank: prune_args(model_dir, out, profile, text))
    try:
        wait_mid_round(state, procs[0])
        procs[1].send_signal(signal.SIGSTOP)  # alive, connected, silent
        stopped = time.time()
        _, err = procs[0].communicate(timeout=TIMEOUT_S + 30)
        waited = time.time() - stopped
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[0].returncode == 3, err
    one_error_line(err, "rank 1 stopped answering", f"waited at most {TIMEOUT_S} s", "--resume")
    assert waited < TIMEOUT_S + 10, waited
    assert state.is_file() and json.loads(state.read_text())["rounds"]


def test_ranks_with_another_checkpoint_are_refused_naming_the_rank(tmp_path, job):
    model_dir, profile, text, _ = job
    other = Path(shutil.copytree(model_dir, tmp_path / "other"))
    edit_config(other, rms_norm_eps=1e-6)
    out = tmp_path / "out"
    procs = start_ranks(lambda rank: prune_args(model_dir if rank == 0 else other, out, profile, text))
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 2, err
        one_error_line(err, "rank 1's source", "differs from rank 0's")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_estimate_shares_the_waves_and_windows_among_ranks(job):
    from typer.testing import CliRunner

    from lowmem_bonsai.cli import app

    model_dir, profile, _, _ = job
    runner = CliRunner()
    got = {}
    for n in (1, 2, 3):
        res = runner.invoke(app, ["estimate", str(model_dir), "--profile", str(profile), "--json",
                                  "--ranks", str(n)])
        assert res.exit_code == 0, res.output
        got[n] = json.loads(res.output)
    # 8 waves of 2 masks over 4 windows of 32 tokens: a rank passes a wave per step of n waves, its
    # slice of each wave of a last, smaller step (3 ranks: 2 whole waves, then 1 of 2 masks of each
    # of the last 2 waves), and ceil(4 / n) windows of the prior pass per round.
    for n, masks, seqs in ((1, 16, 4), (2, 8, 2), (3, 6, 2)):
        assert got[n]["ranks"] == n and got[n]["masks_per_round_per_rank"] == masks
        assert got[n]["forward_tokens_per_round_per_rank"] == 32 * (seqs + 4 * masks)
    assert got[1]["forward_tokens_per_round_per_rank"] == got[1]["forward_tokens_per_round"]
    res = runner.invoke(app, ["estimate", str(model_dir), "--profile", str(profile), "--ranks", "5"])
    assert res.exit_code == 2 and "one calibration window per rank" in res.output
    res = runner.invoke(app, ["estimate", str(model_dir), "--profile", str(profile), "--ranks", "2"])
    assert res.exit_code == 0 and "ranks      2: at most 8 masks" in res.output and "with 2 ranks" in res.output


@pytest.mark.parametrize("line, words", [
    ("dist_timeout_s = 0.0", "dist_timeout_s must be > 0"),
    ("dist_timeout_s = inf", "dist_timeout_s = inf must be a finite number"),
    ("dist_timeout_s = 30", None),  # an integer is taken as a float, like every float key
])
def test_the_timeout_key_is_checked_like_every_key(tmp_path, job, line, words):
    from typer.testing import CliRunner

    from lowmem_bonsai.cli import app

    from .conftest import refused

    model_dir = job[0]
    profile = tmp_path / "p.toml"
    profile.write_text(f"# lowmem-bonsai prune M --profile THIS.toml\n{line}\n")
    res = CliRunner().invoke(app, ["estimate", str(model_dir), "--profile", str(profile), "--json"])
    if words is None:
        assert res.exit_code == 0, res.output
    else:
        refused(res, words)


def test_resume_may_change_the_timeout(tmp_path, job):
    """The timeout is how long to wait, not what was computed: a resume may change it."""
    from lowmem_bonsai.pipeline import run_key
    from lowmem_bonsai.profiles import load_profile
    from lowmem_bonsai.model.checkpoint import Checkpoint
    import torch

    model_dir, profile, _, _ = job
    prof = load_profile(profile)
    ckpt = Checkpoint(model_dir)
    tokens = torch.zeros(4, 32, dtype=torch.long)
    keys = [run_key(ckpt, tokens, p, {"profile": {k: getattr(p, k) for k in p.__dataclass_fields__}})
            for p in (prof, prof.replace(dist_timeout_s=99.0), prof.replace(seq_len=16))]
    assert keys[0] == keys[1] != keys[2]


def test_ranks_whose_auto_dtypes_differ_are_refused_naming_them(tmp_path, monkeypatch):
    """`auto` measures the fastest dtype on each machine; ranks on CPUs that pick differently would
    compute the masks' losses and the repair in different dtypes, so the start refuses them in one
    line that says which dtypes and what to set."""
    from lowmem_bonsai import pipeline
    from lowmem_bonsai.errors import UserError
    from lowmem_bonsai.profiles import Profile

    make_tiny(tmp_path / "m", "llama-gqa-tied")
    key = {"settings": {"profile": {"memory_gb": 1.0}}, "source_hashes": {}, "calib_sha256": "x", "wave_masks": 4}
    profile = Profile(reconstruct="lsq", compute_dtype="auto", reconstruct_dtype="auto")
    picked = {"auto": "bfloat16"}
    monkeypatch.setattr(pipeline, "pick_compute_dtype", lambda name, device=None: (picked.get(name, name), {}))
    mine = pipeline.fingerprint(tmp_path / "m", key, profile)
    assert mine[pipeline.DTYPES_PART] == "bfloat16, bfloat16"
    picked["auto"] = "float32"  # another machine's measurement
    theirs = pipeline.fingerprint(tmp_path / "m", key, profile)
    assert {k for k in mine if mine[k] != theirs[k]} == {pipeline.DTYPES_PART}
    assert pipeline.fingerprint(tmp_path / "m", key, profile.replace(reconstruct="none"))[
        pipeline.DTYPES_PART] == "float32, -"

    class TwoRanks:  # rank 0's parts and rank 1's, as Ranks.gather returns them
        world = 2

        def gather(self, obj, *, what):
            return [mine, theirs]

    with pytest.raises(UserError) as err:
        pipeline.check_same_inputs(TwoRanks(), mine)
    line = str(err.value)
    assert "\n" not in line and "rank 1's dtypes (compute, repair) (float32, float32 against bfloat16, bfloat16)" in line
    assert "set compute_dtype and reconstruct_dtype in the profile" in line
    pipeline.check_same_inputs(type("Same", (TwoRanks,), {"gather": lambda self, obj, what: [mine, mine]})(), mine)
