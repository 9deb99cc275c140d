"""Hostile GGUFs and huge text files: bounded cost, one line, no abort, no temporary files left.

Issue 14: class 4 (absurd counts refused from the file size; a huge text file read only as far as
needed), class 5 (what llama.cpp would abort on is refused before it sees the file; --debug shows
its log), class 8 (SIGTERM during import-gguf/export-gguf) and class 10's GGUF metadata types.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowmem_bonsai.cli import app
from lowmem_bonsai.data import load_tokenizer
from lowmem_bonsai.llamacpp.from_gguf import import_gguf
from lowmem_bonsai.model.checkpoint import Checkpoint
from lowmem_bonsai.outputs import shards
from lowmem_bonsai.pipeline import calibration_tokens
from lowmem_bonsai.profiles import load_profile

from .conftest import refused, sample_words, write_gguf
from .test_gguf_import import needs_llama_cpp

# GGUF value types (gguf-py's GGUFValueType)
U32, I32, F32, STRING, ARRAY, U64 = 4, 5, 6, 8, 9, 10


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory) -> bytes:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


def patch_kv(data: bytes, key: str, *, kind: int | None = None, value: bytes | None = None,
             array_count: int | None = None) -> bytes:
    """``data`` with metadata ``key``'s type, (same-size) value or array length replaced."""
    raw = bytearray(data)
    name = key.encode()
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)  # at the value type
    if kind is not None:
        struct.pack_into("<I", raw, at, kind)
    if value is not None:
        raw[at + 4:at + 4 + len(value)] = value
    if array_count is not None:
        assert struct.unpack_from("<I", raw, at)[0] == ARRAY
        struct.pack_into("<Q", raw, at + 8, array_count)  # after the element type
    return bytes(raw)


def write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def import_(src: Path, out: Path):
    return CliRunner().invoke(app, ["import-gguf", str(src), "--out", str(out)])


# --- class 4: counts that the file cannot hold --------------------------------------------------

ABSURD = {
    "block count 10^8": (dict(key="llama.block_count", value=struct.pack("<I", 10**8)),
                         "'llama.block_count' is 100000000 but the file holds"),
    "array of 2^40 tokens": (dict(key="tokenizer.ggml.tokens", array_count=2**40),
                             "metadata 'tokenizer.ggml.tokens', an array of 1099511627776 elements, needs"),
    "array of 2^40 merges": (dict(key="tokenizer.ggml.merges", array_count=2**40),
                             "an array of 1099511627776 elements"),
    "array of 2^40 token types": (dict(key="tokenizer.ggml.token_type", array_count=2**40),
                                  "an array of 1099511627776 elements"),
}


@pytest.mark.parametrize("case", sorted(ABSURD))
@pytest.mark.parametrize("command", ["import-gguf", "eval"])
def test_absurd_counts_are_refused_from_the_file_size(tmp_path, tiny_gguf_bytes, sample_text, case,
                                                      command):
    patch, words = ABSURD[case]
    src = write(tmp_path, patch_kv(tiny_gguf_bytes, **patch))
    start = time.perf_counter()
    if command == "import-gguf":
        res = import_(src, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    else:
        res = CliRunner().invoke(app, ["eval", str(src), "--data", str(sample_text), "--seq-len", "16"])
    refused(res, str(src), words)
    assert time.perf_counter() - start < 2.0  # refused up front, not after minutes


@pytest.mark.parametrize("patch, words", [
    (lambda d: d[:16] + struct.pack("<Q", 2**50) + d[24:], "the header claims 1125899906842624 metadata entries"),
    (lambda d: d[:8] + struct.pack("<Q", 2**50) + d[16:], "metadata entries and 1125899906842624 tensors"),
    (lambda d: d[:4] + struct.pack("<I", 99) + d[8:], "GGUF version 99 is not supported"),
])
def test_header_counts_beyond_the_file(tmp_path, tiny_gguf_bytes, patch, words):
    d = tiny_gguf_bytes
    src = write(tmp_path, patch(d))
    refused(import_(src, tmp_path / "out"), str(src), words)


def _read_chars() -> int:
    """Bytes this process has read through read(2) so far (memory maps do not count)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.fixture
def huge_text(tmp_path) -> Path:
    """32 MB of text (WikiText repeated): reading it whole would be noticed."""
    words = sample_words()
    path = tmp_path / "huge.txt"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(32 * 2**20 // len(words) + 1):
            f.write(words + "\n")
    return path


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_calibration_reads_only_what_it_uses(tiny_llama, huge_text, tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text("# lowmem-bonsai prune M --profile THIS.toml\ncalib_seqs = 2\nseq_len = 16\n")
    before = _read_chars()
    tokens = calibration_tokens(tiny_llama, huge_text, load_profile(profile))
    read = _read_chars() - before
    assert tokens.shape == (2, 16)
    assert read < 2 * 2**20, f"read {read} bytes of a {huge_text.stat().st_size}-byte file for 32 tokens"
    # the tokens are the file's first ones, as if it had been tokenized whole
    head = huge_text.read_text(encoding="utf-8")[:20000]
    ids = load_tokenizer(tiny_llama).encode(head, add_special_tokens=False).ids
    assert tokens.flatten().tolist() == ids[:32]


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_eval_with_max_seqs_reads_only_what_it_uses(tiny_llama, huge_text):
    before = _read_chars()
    res = CliRunner().invoke(app, ["eval", str(tiny_llama), "--data", str(huge_text), "--seq-len", "16",
                                   "--max-seqs", "2", "--skip", "1"])
    assert res.exit_code == 0, res.output
    assert "(30 tokens, 2 x 16" in res.output
    assert _read_chars() - before < 4 * 2**20


# --- class 10: GGUF metadata of the wrong type ---------------------------------------------------

@pytest.mark.parametrize("patch, words", [
    (dict(key="llama.block_count", kind=F32), "metadata 'llama.block_count' is 2.8"),
    (dict(key="llama.embedding_length", kind=F32), "metadata 'llama.embedding_length' is 8.968"),
    (dict(key="llama.attention.head_count", kind=I32, value=struct.pack("<i", -4)),
     "metadata 'llama.attention.head_count' is -4, expected a positive integer"),
    (dict(key="llama.context_length", value=struct.pack("<I", 0)), "'llama.context_length' is 0"),
    (dict(key="llama.attention.layer_norm_rms_epsilon", value=struct.pack("<f", float("nan"))),
     "'llama.attention.layer_norm_rms_epsilon' is nan, expected a positive number"),
    (dict(key="tokenizer.ggml.bos_token_id", kind=F32), "'tokenizer.ggml.bos_token_id' is"),
])
def test_gguf_metadata_of_the_wrong_type(tmp_path, tiny_gguf_bytes, patch, words):
    src = write(tmp_path, patch_kv(tiny_gguf_bytes, **patch))
    refused(import_(src, tmp_path / "out"), str(src), words)
    assert not (tmp_path / "out").exists()


# --- class 5: what llama.cpp would abort on ------------------------------------------------------

@pytest.mark.parametrize("patch, words", [
    (dict(key="llama.attention.head_count_kv", value=struct.pack("<I", 3)),
     "block 0 has 4 query heads for 3 KV heads"),
    (dict(key="llama.attention.head_count_kv", value=struct.pack("<I", 0)), "for 0 KV heads"),
    (dict(key="llama.attention.head_count", value=struct.pack("<I", 8)),
     "tensor 'blk.0.attn_q.weight' has shape [64, 64], expected [64, 128]"),
    (dict(key="llama.feed_forward_length", value=struct.pack("<I", 96)),
     "tensor 'blk.0.ffn_gate.weight' has shape [64, 128], expected [64, 96]"),
    (dict(key="llama.embedding_length", value=struct.pack("<I", 32)),
     "tensor 'token_embd.weight' has shape [64, "),
    (dict(key="llama.attention.key_length", value=struct.pack("<I", 15)), "key_length 15 and value_length"),
    (dict(key="general.architecture", kind=U32, value=struct.pack("<Q", 0)[:0]), "truncated or corrupt"),
    (dict(key="llama.rope.freq_base", value=struct.pack("<f", -1.0)), "'llama.rope.freq_base' is -1.0"),
])
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_what_llama_cpp_would_abort_on_is_refused_first(tmp_path, tiny_gguf_bytes, sample_text, patch,
                                                       words, command):
    src = write(tmp_path, patch_kv(tiny_gguf_bytes, **patch))
    args = (["eval", str(src), "--data", str(sample_text), "--seq-len", "16"] if command == "eval"
            else ["generate", str(src), "--prompt", "The"])
    refused(CliRunner().invoke(app, args), str(src), words)


@pytest.mark.parametrize("patch, words", [
    (dict(key="llama.block_count", value=struct.pack("<I", 10**8)), "'llama.block_count' is 100000000"),
    (dict(key="llama.attention.layer_norm_rms_epsilon", value=struct.pack("<f", float("nan"))),
     "'llama.attention.layer_norm_rms_epsilon' is nan, expected a positive finite number"),
])
def test_files_that_made_llama_cpp_abort(tmp_path, tiny_gguf_bytes, patch, words):
    """Both made llama-cpp-python 0.3.36 die with SIGABRT and no output; a subprocess, so that a
    regression fails this test instead of killing the test run."""
    src = write(tmp_path, patch_kv(tiny_gguf_bytes, **patch))
    res = subprocess.run([sys.executable, "-m", "lowmem_bonsai.cli", "generate", str(src), "--prompt", "The",
                          "-n", "2"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and words in res.stderr, res.stderr


@needs_llama_cpp
def test_debug_shows_llama_cpp_log(tmp_path, tiny_gguf_bytes):
    src = write(tmp_path, tiny_gguf_bytes, "ok.gguf")
    cmd = [sys.executable, "-m", "lowmem_bonsai.cli", "generate", str(src), "--prompt", "The", "-n", "2"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    loud = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and loud.returncode == 0, (quiet.stderr, loud.stderr)
    assert "llama_model_loader" not in quiet.stderr
    assert "llama_model_loader" in loud.stderr  # llama.cpp's own log, not just ours


# --- class 8: SIGTERM during import-gguf and export-gguf ----------------------------------------

def _terminate_on_call(monkeypatch, module, name: str, at: int) -> list[int]:
    """Send this process SIGTERM at the ``at``-th call of ``module.name``."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler runs here, as a signal would land mid-write
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.fixture
def sigterm_guard():
    """Should the CLI not handle SIGTERM, the test (not pytest) notices: the default would kill all."""
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append(1))
    yield seen
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_import_leaves_nothing(tmp_path, tiny_gguf_bytes, monkeypatch, sigterm_guard):
    src = write(tmp_path, tiny_gguf_bytes, "ok.gguf")
    out = tmp_path / "out"
    _terminate_on_call(monkeypatch, shards.ShardWriter, "add", 3)  # a shard is half-written
    res = CliRunner().invoke(app, ["import-gguf", str(src), "--out", str(out)])
    assert not sigterm_guard, "the CLI did not handle SIGTERM"
    assert res.exit_code == 143 and "terminated" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.gguf"]


@pytest.mark.parametrize("type", ["f16", "q4_k_m"])  # q4_k_m: a second temporary file, requantized
def test_sigterm_during_export_leaves_nothing(tmp_path, tiny_gguf_bytes, monkeypatch, sigterm_guard, type):
    model = import_gguf(gguf_path=write(tmp_path, tiny_gguf_bytes, "ok.gguf"), out_dir=tmp_path / "hf")
    out = tmp_path / "m.gguf"
    _terminate_on_call(monkeypatch, Checkpoint, "get", 5)
    res = CliRunner().invoke(app, ["export-gguf", str(model), "--out", str(out), "--type", type])
    assert not sigterm_guard, "the CLI did not handle SIGTERM"
    assert res.exit_code == 143 and "terminated" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "ok.gguf"]


@pytest.mark.parametrize("metadata, context", [
    ({"llama.context_length": 8192}, 8192),
    ({"llama.context_length": 4096, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, 16384),
    ({"llama.context_length": 4096, "llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}, 4096),
    ({"llama.context_length": 0}, None),
    ({}, None),
])
def test_the_context_a_gguf_runs_at_counts_its_rope_scaling(tmp_path, metadata, context):
    from lowmem_bonsai.llamacpp.check import GgufSummary, trained_context

    summary = GgufSummary(tmp_path / "x.gguf", {"general.architecture": "llama", **metadata}, {}, {})
    assert trained_context(summary) == context
