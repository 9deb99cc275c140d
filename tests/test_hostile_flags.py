"""Out-of-range flags and values of the wrong type: one line, exit status 2, never a number or a
traceback. (Issue 14, classes 9 and 10; the GGUF cases are in test_hostile_gguf.py.)
"""

from __future__ import annotations

import json
import math
import struct

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from typer.testing import CliRunner

from lowmem_bonsai.cli import app

from .conftest import refused

DEEP = 100_000  # nesting that exhausts Python's recursion limit


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def eval_args(model, text, *extra):
    return ["eval", model, "--data", text, "--seq-len", "16", *extra]


# --- class 9: out-of-range flags --------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--batch-seqs", "0"], "--batch-seqs 0: expected at least 1"),
    (["--batch-seqs", "-3"], "--batch-seqs -3: expected at least 1"),
    (["--max-seqs", "-1"], "--max-seqs -1: expected at least 1"),
    (["--max-seqs", "0"], "--max-seqs 0: expected at least 1"),
    (["--skip", "-2"], "--skip -2: expected 0 or more"),
    (["--seq-len", "1"], "--seq-len 1: need at least 2"),
    (["--threads", "-1"], "--threads -1: expected at least 1"),
])
def test_eval_refuses_out_of_range_flags(tiny_llama, sample_text, flags, words):
    refused(run(*eval_args(tiny_llama, sample_text, *flags)), words)


@pytest.mark.parametrize("flags, words", [
    (["--skip", "100000000"], "none after the 100000000 used for calibration"),
    (["--skip", "100000000", "--max-seqs", "100000000"], "none after the 100000000 used for calibration"),
    (["--seq-len", "100000000"], "give 0 windows of 100000000"),
])
def test_eval_refuses_windows_beyond_the_text_without_reading_that_much(tiny_llama, sample_text, flags, words):
    """The text is read for as many tokens as the flags need: never a buffer that large up front."""
    refused(run(*eval_args(tiny_llama, sample_text, *flags)), words)


def test_reading_a_prefix_never_asks_for_more_bytes_than_the_file_holds(sample_text):
    """read(n) allocates n bytes first: a prefix of 2^62 bytes of a small file is the whole file."""
    from lowmem_bonsai.data import read_text_part

    text, complete = read_text_part(sample_text, max_bytes=2**62)
    assert complete and text == Path(sample_text).read_text()


@pytest.mark.parametrize("args, words", [
    (["eval", "MODEL", "--data", "TEXT", "--seq-len", "abc"],
     "error: Invalid value for '--seq-len'"),
    (["eval", "MODEL"], "error: Missing option '--data'"),
    (["evl"], "error: No such command 'evl'. Did you mean 'eval'?"),
    (["prune", "MODEL", "--sparsity", "abc"], "error: Invalid value for '--sparsity'"),
    (["eval", "MODEL", "--data", "TEXT", "--no-such-flag"], "error: No such option: --no-such-flag"),
])
def test_usage_errors_are_one_line_naming_the_help(tiny_llama, sample_text, args, words):
    args = [str(tiny_llama) if a == "MODEL" else str(sample_text) if a == "TEXT" else a for a in args]
    line = refused(run(*args), words)
    assert line.endswith("--help)"), line


@pytest.mark.parametrize("sparsity", ["5", "-0.1", "0", "1", "nan", "inf"])
def test_estimate_refuses_sparsity_outside_0_1(tiny_llama, sparsity):
    refused(run("estimate", tiny_llama, "--sparsity", sparsity, "--profile", "quick"),
            f"--sparsity {float(sparsity)}: must be between 0 and 1")


def test_nan_perplexity_is_an_error_naming_the_tensor(tiny_llama, sample_text):
    path = tiny_llama / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = math.nan
    save_file(tensors, path, metadata={"format": "pt"})
    refused(run(*eval_args(tiny_llama, sample_text, "--max-seqs", "2")),
            f"{path}: tensor 'model.layers.1.mlp.down_proj.weight' holds NaN or Inf (the perplexity "
            "is not finite)")


# --- class 10: seeds, prompts, tokenizers, profiles -------------------------------------------

@pytest.mark.parametrize("seed", [str(2**64), str(-1), str(10**30)])
def test_prune_refuses_a_seed_beyond_64_bits(tmp_path, tiny_llama, sample_text, seed):
    res = run("prune", tiny_llama, "--out", tmp_path / "out", "--calib", sample_text, "--profile",
              "quick", "--seed", seed)
    refused(res, f"--seed {seed}: expected 0 to 2**64 - 1")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("flags, words", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "hi", "--seed", str(2**32 - 1)], f"--seed {2**32 - 1}: expected 0 to {2**32 - 2}"),
    (["--prompt", "hi", "--seed", "-5"], "--seed -5"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature -1.0: expected 0 (greedy)"),
    (["--prompt", "hi", "--temperature", "nan"], "--temperature nan"),
    (["--prompt", "hi", "-n", "0"], "-n 0: expected at least 1"),
])
def test_generate_refuses_bad_flags_before_loading(tmp_path, flags, words):
    refused(run("generate", tmp_path / "never-read.gguf", *flags), words)


def test_tokenizer_without_its_unknown_token(tiny_llama, sample_text):
    tok = Tokenizer(models.WordLevel({"the": 0, "a": 1}, unk_token="[UNK]"))  # [UNK] not in vocab
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tiny_llama / "tokenizer.json"))
    refused(run(*eval_args(tiny_llama, sample_text)),
            f"{tiny_llama / 'tokenizer.json'}: the unknown token '[UNK]' is not in the vocabulary")


@pytest.mark.parametrize("line, words", [
    ("memory_gb = inf", "memory_gb = inf must be a finite number"),
    ("memory_gb = nan", "memory_gb = nan must be a finite number"),
    ("memory_gb = -4.0", "memory_gb > 0"),
    ("prune_frac = inf", "prune_frac = inf must be a finite number"),
    ("device_memory_gb = -inf", "device_memory_gb = -inf must be a finite number"),
    ("masks_per_round = 8.5", "'masks_per_round' = 8.5 should be an integer"),
    ("masks_per_round = true", "'masks_per_round' = True should be an integer"),
    ('device = "cuda:abc"', "device must be cpu, cuda or cuda:N"),
    ("chunk_tokens = 0", "chunk_tokens must be >= 1"),
])
def test_profile_with_impossible_numbers(tmp_path, tiny_llama, line, words):
    profile = tmp_path / "p.toml"
    profile.write_text(f"# lowmem-bonsai prune M --profile THIS.toml\n{line}\n")
    refused(run("estimate", tiny_llama, "--profile", profile), words)


# --- deeply nested or wrongly typed JSON and TOML -------------------------------------------

def test_deeply_nested_profile(tmp_path, tiny_llama):
    profile = tmp_path / "deep.toml"
    profile.write_text("a = " + "[" * DEEP + "]" * DEEP + "\n")
    refused(run("estimate", tiny_llama, "--profile", profile), f"{profile}: not valid TOML")


def _rewrite_header(path, edit):
    """Replace model.safetensors' JSON header with ``edit(header)`` (bytes), keeping the data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = edit(json.loads(raw[8:8 + n]))
    new = header if isinstance(header, bytes) else json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def _shape_as_strings(h):
    h["model.norm.weight"]["shape"] = [str(d) for d in h["model.norm.weight"]["shape"]]
    return h


def _offsets_as_floats(h):
    h["model.norm.weight"]["data_offsets"] = [float(x) for x in h["model.norm.weight"]["data_offsets"]]
    return h


def _index(weight_map):
    def write(d):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return write


def _int_weight(dtype):
    def write(d):
        tensors = load_file(d / "model.safetensors")
        w = tensors["model.layers.0.mlp.up_proj.weight"]
        tensors["model.layers.0.mlp.up_proj.weight"] = (w > 0) if dtype is torch.bool else w.to(dtype)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return write


BROKEN = {
    "config nested": (lambda d: (d / "config.json").write_text("[" * DEEP + "]" * DEEP),
                      "config.json: not valid JSON"),
    "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json: expected a JSON object"),
    "index nested": (lambda d: (d / "model.safetensors.index.json").write_text("{\"weight_map\": " + "[" * DEEP
                                                                                + "]" * DEEP + "}"),
                     "model.safetensors.index.json: not a valid index"),
    "index map a list": (_index(["model.safetensors"]), "'weight_map' must map tensor names to shard file names"),
    "index shard an int": (_index({"model.norm.weight": 7}), "'weight_map' must map"),
    "index shard outside": (_index({"model.norm.weight": "../elsewhere.safetensors"}), "'weight_map' must map"),
    "header nested": (lambda d: _rewrite_header(d / "model.safetensors", lambda h: b"[" * 5000 + b"]" * 5000),
                      "not a readable safetensors file"),
    "header a list": (lambda d: _rewrite_header(d / "model.safetensors", lambda h: [h]),
                      "the safetensors header is not a JSON object"),
    "header shape strings": (lambda d: _rewrite_header(d / "model.safetensors", _shape_as_strings),
                             "corrupt header entry for 'model.norm.weight'"),
    "header offsets floats": (lambda d: _rewrite_header(d / "model.safetensors", _offsets_as_floats),
                              "corrupt header entry for 'model.norm.weight'"),
    "int32 weights": (_int_weight(torch.int32), "tensor 'model.layers.0.mlp.up_proj.weight' is stored as I32; "
                      "expected floating-point weights"),
    "bool weights": (_int_weight(torch.bool), "is stored as BOOL; expected floating-point weights"),
    "int8 weights": (_int_weight(torch.int8), "is stored as I8"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_wrong_json_types_and_weights_are_one_line(tmp_path, tiny_llama, sample_text, case):
    breaker, words = BROKEN[case]
    breaker(tiny_llama)
    res = run("prune", tiny_llama, "--out", tmp_path / "out", "--calib", sample_text, "--profile", "quick")
    refused(res, str(tiny_llama), words)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_header_byte_patch_helper_keeps_the_data(tiny_llama):
    """_rewrite_header changes only the header: the weights read back the same."""
    before = {k: v.clone() for k, v in load_file(tiny_llama / "model.safetensors").items()}
    _rewrite_header(tiny_llama / "model.safetensors", lambda h: h)
    after = load_file(tiny_llama / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert struct.unpack("<Q", (tiny_llama / "model.safetensors").read_bytes()[:8])[0] % 8 == 0


def test_reconstruct_bias_on_a_reselecting_profile_runs_with_bias(tmp_path, tiny_llama, sample_text):
    """A profile that reselects the channels (lsq's option, as quick does) with --reconstruct bias:
    the flag turns the reselection off rather than refusing the profile's own choice."""
    profile = tmp_path / "reselecting.toml"
    profile.write_text("masks_per_round = 8\ncalib_seqs = 2\nseq_len = 16\nprune_frac = 0.2\nalign = 8\n"
                       'memory_gb = 4.0\nreconstruct = "lsq"\nreconstruct_seqs = 4\nreconstruct_seq_len = 16\n'
                       "reconstruct_reselect = true\n")
    res = run("prune", tiny_llama, "--out", tmp_path / "out", "--calib", sample_text, "--profile", profile,
              "--sparsity", "0.2", "--reconstruct", "bias")
    assert res.exit_code == 0, (res.output, res.exception)
    used = json.loads((tmp_path / "out" / "plan.json").read_text())["settings"]["profile"]
    assert used["reconstruct"] == "bias" and used["reconstruct_reselect"] is False
    assert json.loads((tmp_path / "out" / "report.json").read_text())["reconstruction"]["mode"] == "bias"


def test_a_missing_or_wrong_kind_of_model_path_says_which(tmp_path, sample_text):
    refused(run(*eval_args(tmp_path / "absent", sample_text)), f"{tmp_path / 'absent'}: no such folder")
    refused(run(*eval_args(sample_text, sample_text)), f"{sample_text}: is a file, not a folder")
    refused(run("generate", tmp_path, "--prompt", "hi"), f"{tmp_path}: is a folder; expected a .gguf")


@pytest.mark.parametrize("flags, words, given", [
    (["--prior", "foo"], "prior must be wanda, magnitude, fluctuation or random", "--prior foo"),
    (["--masks-per-round", "3"], "masks_per_round must be an even number >= 2", "--masks-per-round 3"),
    (["--seq-len", "64", "--reconstruct-seqs", "0"], "reconstruct_seqs must be >= 1", "--reconstruct-seqs 0"),
    (["--reconstruct-position-power", "-1"], "reconstruct_position_power must be in [0, 4]",
     "--reconstruct-position-power -1.0"),
    (["--reconstruct-gap-weight", "1.5"], "reconstruct_gap_weight must be in [0, 1]", "--reconstruct-gap-weight 1.5"),
    (["--reconstruct-gap-weight", "0.5", "--reconstruct-target", "layer"],
     "reconstruct_gap_weight > 0 needs reconstruct_target",
     "--reconstruct-target layer, --reconstruct-gap-weight 0.5"),
    (["--reconstruct-target", "layer"], "reconstruct_gap_weight = 0 repairs once",  # quick's own 0.75
     "--reconstruct-target layer"),
])
def test_a_flag_the_profile_checks_refuse_is_named_as_the_flag(tmp_path, tiny_llama, sample_text, flags, words,
                                                              given):
    line = refused(run("prune", tiny_llama, "--out", tmp_path / "out", "--calib", sample_text, "--profile",
                       "quick", *flags), words)
    assert line.endswith(f"(given by {given})"), line  # only the flags that were refused
    assert not (tmp_path / "out").exists()
