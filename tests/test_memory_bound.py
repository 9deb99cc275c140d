"""The memory plan is an upper bound of what a prune really holds (tools/bench_memory.py: real shapes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowmem_bonsai.estimate import estimate
from lowmem_bonsai.profiles import load_profile

from .conftest import make_tiny, write_word_tokenizer, sample_words


def rss_anon(pid: int) -> int | None:
    """The process's resident anonymous memory in bytes (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@pytest.mark.parametrize("target, reselect, dtype", [("layer", False, "float32"), ("stream", False, "float32"),
                                                     ("stream", True, "float32"), ("stream", True, "bfloat16")])
def test_a_prune_with_reconstruction_stays_below_its_plan(tmp_path, sample_text, target, reselect, dtype):
    """stream: the dense model's stream and the cross moments are held beside the pruned ones;
    reselect: the greedy choice's inverse beside the Gram matrix; bfloat16: the repair's passes in
    bf16 (the plan counts fp32 blocks and activations; the casts back to fp32 must fit in that)."""
    model = tmp_path / "m"
    make_tiny(model, "llama-mha-untied", layers=4, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
              num_key_value_heads=8, head_dim=64)
    write_word_tokenizer(model, sample_words())
    profile = tmp_path / "small.toml"
    profile.write_text('compute_dtype = "float32"\nmasks_per_round = 4\ncalib_seqs = 2\nseq_len = 64\n'
                       'prune_frac = 0.1\nmemory_gb = 4.0\nreconstruct = "lsq"\nreconstruct_seqs = 4\n'
                       'reconstruct_seq_len = 64\n'
                       f'reconstruct_target = "{target}"\nreconstruct_reselect = {str(reselect).lower()}\n'
                       f'reconstruct_dtype = "{dtype}"\n')
    planned = estimate(model_dir=model, profile=load_profile(profile), sparsity=0.1,
                       measure_seconds=0.05)["memory"]["total_gb"] * 1024**3
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowmem_bonsai.cli", "prune", str(model), "--out", str(tmp_path / "out"),
         "--sparsity", "0.1", "--profile", str(profile), "--calib", str(sample_text)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_anon(proc.pid) or 0)
        time.sleep(0.005)
    assert proc.returncode == 0, proc.stderr.read().decode()
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert peak > 0.1 * 1024**3  # the sampling saw the run
    print(f"peak {peak / 1024**3:.3f} GiB, planned {planned / 1024**3:.3f} GiB")
    assert peak < planned, f"measured {peak / 1024**3:.2f} GiB above the plan's {planned / 1024**3:.2f} GiB"
