"""Hostile inputs and crash-safety of `prune` and `import-gguf`.

Each problem is one line naming the file and the fix, exit status 2, no traceback; a prune that
fails before scoring anything leaves nothing behind, one that fails later keeps its progress in
OUT.partial so that `--resume` finishes it. (Broken checkpoints under `eval`: test_checkpoint.py;
SIGKILL and Ctrl-C: test_resume.py; broken GGUFs: test_gguf_import.py.)
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import lowmem_bonsai
from lowmem_bonsai.method import prune as prune_module
from lowmem_bonsai.outputs import shards
from lowmem_bonsai.cli import app
from lowmem_bonsai.pipeline import prune_model, work_dir
from lowmem_bonsai.model.plan import Plan
from lowmem_bonsai.profiles import load_profile

from .conftest import (BROKEN_CHECKPOINTS, make_tiny, mount_tmpfs, refused, refused_import, truncate, write_gguf,
                       write_word_tokenizer)

PROFILE = """# lowmem-bonsai prune M --out O --profile THIS.toml
compute_dtype = "float32"
masks_per_round = 8
wave_masks = 4
calib_seqs = 2
seq_len = 16
prune_frac = 0.2
align = 8
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return {"model": tmp_path_factory.mktemp("hostile") / "m"}


@pytest.fixture
def model_dir(tmp_path, sample_text, built) -> Path:
    """A fresh copy of one tiny Llama (GQA, tied, 2 layers) with a word tokenizer."""
    src = built["model"]
    if not src.exists():  # built once per module: the sample text is the same in every test
        make_tiny(src, "llama-gqa-tied", layers=2)
        write_word_tokenizer(src, sample_text.read_text())
    shutil.copytree(src, tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture
def profile(tmp_path) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(PROFILE)
    return path


def prune(model_dir: Path, out: Path, calib: Path, profile: Path, *extra: str):
    args = ["prune", str(model_dir), "--out", str(out), "--calib", str(calib), "--profile",
            str(profile), "--seed", "3"]
    if not any(a.startswith("--sparsity") for a in extra):
        args.append("--sparsity=0.4")
    return CliRunner().invoke(app, [*args, *extra])


def nothing_left(out: Path) -> None:
    assert not out.exists() and not work_dir(out).exists()


def poison(model_dir: Path, name: str, value: float, index: int = 0) -> None:
    """Overwrite one element of an F32 tensor in model.safetensors (the header stays the same)."""
    path = model_dir / "model.safetensors"
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))[name]
        assert meta["dtype"] == "F32"
        f.seek(8 + n + meta["data_offsets"][0] + 4 * index)
        f.write(struct.pack("<f", value))


# --- refused before any work: nothing is left behind -------------------------------------------

@pytest.mark.parametrize("case", sorted(BROKEN_CHECKPOINTS))
def test_prune_refuses_a_broken_checkpoint(tmp_path, model_dir, sample_text, profile, case):
    breaker, words = BROKEN_CHECKPOINTS[case]
    breaker(model_dir)
    out = tmp_path / "out"
    line = refused(prune(model_dir, out, sample_text, profile), words)
    assert str(model_dir) in line
    nothing_left(out)


@pytest.mark.parametrize("content, words", [
    (b"", "is empty"),
    (b"  \n\t\n", "is empty"),
    (b"GGUF\x03\x00\x00\x00\x00\x00" * 50, "looks binary"),
    ("caf\u00e9 na\u00efve ".encode("latin-1") * 50, "not UTF-8 (byte 3)"),
    (b"just a few words", "windows of 16"),
    (None, "data file not found"),
])
def test_prune_refuses_bad_calibration_text(tmp_path, model_dir, profile, content, words):
    calib = tmp_path / "calib.txt"
    if content is not None:
        calib.write_bytes(content)
    out = tmp_path / "out"
    line = refused(prune(model_dir, out, calib, profile), words)
    assert str(calib) in line
    nothing_left(out)


@pytest.mark.parametrize("sparsity", ["0", "1", "-0.2", "1.5", "nan", "inf"])
def test_prune_refuses_sparsity_outside_0_1(tmp_path, model_dir, sample_text, profile, sparsity):
    out = tmp_path / "out"
    refused(prune(model_dir, out, sample_text, profile, f"--sparsity={sparsity}"),
            f"--sparsity {float(sparsity)}: must be between 0 and 1")
    nothing_left(out)


def test_prune_refuses_a_memory_budget_too_small(tmp_path, model_dir, sample_text, profile):
    profile.write_text(PROFILE + "memory_gb = 0.05\n")
    out = tmp_path / "out"
    refused(prune(model_dir, out, sample_text, profile),
            "profile 'p': memory budget 0.05 GB is too small", "raise memory_gb")
    nothing_left(out)


# --- NaN or Inf, found by the prior pass ------------------------------------------------------

@pytest.mark.parametrize("name, value, found", [
    ("model.layers.1.mlp.down_proj.weight", math.nan, "the MLP prior of layer 1"),
    ("model.layers.0.self_attn.q_proj.weight", math.inf, "the attention prior of layer 0"),
    ("model.embed_tokens.weight", math.nan, "the attention prior of layer 0"),  # row 0: [UNK]
    ("model.norm.weight", -math.inf, "the calibration loss"),
])
def test_nonfinite_weight_is_named(tmp_path, model_dir, sample_text, profile, name, value, found):
    poison(model_dir, name, value)
    out = tmp_path / "out"
    refused(prune(model_dir, out, sample_text, profile),
            f"{model_dir / 'model.safetensors'}: tensor '{name}' holds NaN or Inf ({found} is "
            "not finite); the checkpoint is corrupt: re-download or re-create it")
    nothing_left(out)


def test_overflow_with_finite_weights_says_use_float32(tmp_path, sample_text, profile):
    """Finite fp16 weights whose activations overflow in fp16 compute: not a corrupt checkpoint."""
    model_dir = tmp_path / "m16"
    model = make_tiny(model_dir, "llama-gqa-tied", layers=2)
    write_word_tokenizer(model_dir, sample_text.read_text())
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["model.layers.0.mlp.up_proj.weight"] *= 3e3  # products near 65504, the fp16 maximum
    state["model.layers.0.mlp.gate_proj.weight"] *= 3e3
    save_file({k: v.to(torch.float16) for k, v in state.items()}, model_dir / "model.safetensors",
              metadata={"format": "pt"})
    profile.write_text(PROFILE.replace('"float32"', '"float16"'))
    out = tmp_path / "out"
    refused(prune(model_dir, out, sample_text, profile), f"{model_dir}: the MLP prior of layer 0 is "
            "NaN or Inf although the weights are finite", 'compute_dtype = "float32"')
    nothing_left(out)


# --- a full disk --------------------------------------------------------------------------------

@dataclass
class SmallDisk:
    """A folder whose disk can be made full and freed again."""

    path: Path
    fill: Callable[[], None]
    free: Callable[[], None]

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.name != "ballast")


@pytest.fixture(params=["tmpfs", "patched"])
def small_disk(request, tmp_path, monkeypatch) -> SmallDisk:
    """A 2 MB tmpfs (needs root) really filled by a ballast file, or safetensors made to fail.

    The patched variant makes the shard writer's writes fail as a full disk does.
    """
    path = tmp_path / "disk"
    path.mkdir()
    if request.param == "tmpfs":
        mount_tmpfs(request, path, "size=2M", why="mounting a tmpfs needs root")
        ballast = path / "ballast"

        def fill() -> None:  # leave 48 KB: room for the progress, not for the weights
            st = os.statvfs(path)
            ballast.write_bytes(bytes(st.f_bavail * st.f_frsize - 48 * 1024))

        return SmallDisk(path, fill, lambda: ballast.unlink())

    full = {"on": False}
    real_pwrite = os.pwrite

    def failing_pwrite(fd, data, offset):
        if full["on"]:
            real_pwrite(fd, bytes(min(len(data), 4096)), offset)  # what got written before the disk filled
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(shards.os, "pwrite", failing_pwrite)
    return SmallDisk(path, lambda: full.update(on=True), lambda: full.update(on=False))


def test_disk_full_while_writing_the_pruned_model_keeps_the_pruning(
        small_disk, model_dir, sample_text, profile, monkeypatch):
    out = small_disk.path / "out"
    work = work_dir(out)
    small_disk.fill()
    line = refused(prune(model_dir, out, sample_text, profile), "the disk is full",
                   "free disk space and rerun the same command with --resume")
    assert str(work) in line
    assert small_disk.leftovers() == ["out.partial"]  # no output, no half-written shard
    assert sorted(p.name for p in work.iterdir()) == ["state.json"]
    state = json.loads((work / "state.json").read_text())
    assert len(state["rounds"]) >= 2 and state["round_start"] is None  # all rounds are saved

    small_disk.free()
    passes = []
    real_nll = prune_module.streamed_nll

    def counted_nll(*args, **kwargs):
        passes.append(1)
        return real_nll(*args, **kwargs)

    monkeypatch.setattr(prune_module, "streamed_nll", counted_nll)
    res = prune(model_dir, out, sample_text, profile, "--resume")
    assert res.exit_code == 0, (res.output, res.exception)
    assert not passes  # nothing was scored again
    assert Plan.load(out / "plan.json").layers == Plan.from_json(state["plan"]).layers
    assert json.loads((out / "report.json").read_text())["rounds"] == state["rounds"]
    assert small_disk.leftovers() == ["out"]


def test_disk_full_during_import_gguf(small_disk, tmp_path):
    src = write_gguf(tmp_path / "tiny.gguf")
    out = small_disk.path / "hf"
    small_disk.fill()
    res = CliRunner().invoke(app, ["import-gguf", str(src), "--out", str(out)])
    refused(res, f"{out}: the disk is full", "free disk space or pick another --out")
    assert small_disk.leftovers() == []
    small_disk.free()
    res = CliRunner().invoke(app, ["import-gguf", str(src), "--out", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    assert (out / "config.json").is_file()


# --- hostile inputs met by --resume: the progress survives ---------------------------------------

def test_resume_refusals_keep_the_progress(tmp_path, model_dir, sample_text, profile):
    out, calib = tmp_path / "out", sample_text
    work = work_dir(out)

    def stop_after_round_1(stage: str, done: int, total: int) -> None:
        if stage == "round" and done == 1:
            raise KeyboardInterrupt  # as Ctrl-C would, with round 1 saved

    with pytest.raises(KeyboardInterrupt):
        prune_model(model_dir=model_dir, out_dir=out, sparsity=0.4, profile=load_profile(profile),
                    calib=calib, seed=3, progress=stop_after_round_1)
    rounds = json.loads((work / "state.json").read_text())["rounds"]
    assert len(rounds) == 1

    weights, text = (model_dir / "model.safetensors").read_bytes(), calib.read_bytes()
    breakers = [
        (lambda: truncate(model_dir / "model.safetensors", -1000), [], "truncated"),
        (lambda: calib.write_bytes(b"\x00\x01" * 100), [], "looks binary"),
        (lambda: calib.write_bytes(b"\xff" + text), [], "not UTF-8"),
        (lambda: None, ["--sparsity=1.5"], "between 0 and 1"),
        (lambda: poison(model_dir, "model.layers.1.input_layernorm.weight", math.nan), [],
         "holds NaN or Inf"),  # found by round 2's prior pass, after the state was reopened
    ]
    for brk, extra, words in breakers:
        brk()
        refused(prune(model_dir, out, calib, profile, "--resume", *extra), words)
        assert json.loads((work / "state.json").read_text())["rounds"] == rounds
        assert not out.exists()
        (model_dir / "model.safetensors").write_bytes(weights)
        calib.write_bytes(text)

    res = prune(model_dir, out, calib, profile, "--resume")
    assert res.exit_code == 0, (res.output, res.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["rounds"][0] == rounds[0] and len(report["rounds"]) > 1
    assert not work.exists()


# --- GGUF with impossible tensor sizes ------------------------------------------------------------

@pytest.mark.parametrize("dims, offset", [
    ((64, 128 * 1000), None),  # far more rows than the file holds
    ((2**62, 2**62), None),  # an element count that overflows 64 bits
    (None, 2**40),  # data that starts a terabyte past the end
])
def test_gguf_with_impossible_tensor_sizes(tmp_path, dims, offset):
    data = bytearray(write_gguf(tmp_path / "ok.gguf").read_bytes())
    name = b"blk.0.ffn_up.weight"  # tensor info: name, n_dims u32, dims u64..., type u32, offset u64
    at = data.index(name) + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    if dims is not None:
        struct.pack_into(f"<{n_dims}Q", data, at + 4, *dims)
    if offset is not None:
        struct.pack_into("<Q", data, at + 4 + 8 * n_dims + 4, offset)
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    refused_import(tmp_path, tmp_path / "bad.gguf", "truncated or corrupt, re-download it")


# --- nothing is ever unpickled --------------------------------------------------------------------

def test_no_code_path_unpickles():
    """Weights come from safetensors and GGUF only: a static guard against pickle creeping in."""
    package = Path(lowmem_bonsai.__file__).parent
    sources = sorted(package.rglob("*.py"))
    assert len(sources) > 10
    banned = re.compile(r"torch\.load|pickle|weights_only")
    hits = [f"{p.relative_to(package.parent)}:{i}: {line.strip()}" for p in sources
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if banned.search(line)]
    assert not hits, "unpickling code in the package:\n" + "\n".join(hits)
