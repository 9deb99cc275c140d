"""The executor on a CUDA GPU against transformers and against itself on the CPU.

Skipped where torch sees no GPU (CI, the 2-core development machines); tools/check_cuda.sh runs
these where a GPU is lent. LOWMEM_BONSAI_TEST_DEVICE=cpu runs them on the CPU (a check of the tests).
"""

from __future__ import annotations

import os

import pytest
import torch

from lowmem_bonsai.model.checkpoint import Checkpoint
from lowmem_bonsai.evaluate import evaluate
from lowmem_bonsai.engine.forward import MaskSet, streamed_nll, streamed_pass
from lowmem_bonsai.pipeline import prune_model
from lowmem_bonsai.model.plan import Plan
from lowmem_bonsai.profiles import load_profile

from .conftest import hf_nll, make_tiny, write_word_tokenizer

CUDA = torch.device(os.environ.get("LOWMEM_BONSAI_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA GPU visible")


def test_cuda_forward_matches_transformers(tmp_path, family):
    model = make_tiny(tmp_path, family)
    tokens = torch.randint(0, 211, (3, 40), generator=torch.Generator().manual_seed(1))
    ours = streamed_nll(Checkpoint(tmp_path), tokens, chunk_tokens=64, device=CUDA)[0]
    assert ours.device.type == "cpu"
    torch.testing.assert_close(ours, hf_nll(model, tokens), rtol=1e-4, atol=0)


def test_cuda_masks_stats_and_teacher_equal_the_cpu(tmp_path):
    make_tiny(tmp_path, "llama-gqa-tied")
    ckpt = Checkpoint(tmp_path)
    cfg = ckpt.config
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 211, (2, 24), generator=g)
    masks = MaskSet([(torch.rand(6, s.num_attention_heads, generator=g) > 0.3).float() for s in cfg.layers],
                    [(torch.rand(6, s.intermediate_size, generator=g) > 0.3).float() for s in cfg.layers])
    plan = Plan.dense(cfg)
    out = {}
    for name, dev in (("ref", torch.device("cpu")), ("dev", CUDA)):
        first = streamed_pass(ckpt, tokens, plan=plan, want_stats=True, want_teacher=True, device=dev)
        masked = streamed_nll(ckpt, tokens, plan=plan, masks=masks, soft=first.teacher, device=dev)
        out[name] = (first.nll, masked, first.stats, first.teacher)
    (b0, m0, s0, t0), (b1, m1, s1, t1) = out["ref"], out["dev"]
    torch.testing.assert_close(b1, b0, rtol=1e-4, atol=0)
    torch.testing.assert_close(m1, m0, rtol=1e-4, atol=0)
    torch.testing.assert_close(t1.probs, t0.probs, rtol=1e-3, atol=1e-5)
    for c0, c1 in zip(s0, s1):
        assert c1.o_abs_mean.device.type == "cpu" and c1.act.chan_sq.device.type == "cpu"
        torch.testing.assert_close(c1.act.chan_sq, c0.act.chan_sq, rtol=1e-4, atol=1e-6)


def test_cuda_prune_reaches_the_target(tmp_path, sample_text):
    make_tiny(tmp_path / "m", "llama-gqa-tied", layers=4, intermediate_size=256, num_attention_heads=8,
              num_key_value_heads=4)
    write_word_tokenizer(tmp_path / "m", sample_text.read_text())
    prof = load_profile("gpu-24gb").replace(seq_len=32, calib_seqs=4, masks_per_round=16, align=8,
                                            prune_frac=0.1, device_memory_gb=0.0, memory_gb=8.0,
                                            device=str(CUDA))
    rep = prune_model(model_dir=tmp_path / "m", out_dir=tmp_path / "p", sparsity=0.2, profile=prof,
                      calib=sample_text, method="bonsai", seed=0)
    assert abs(rep["achieved_sparsity"] - 0.2) < 0.03


def test_cuda_eval_equals_the_cpu(tmp_path, sample_text):
    make_tiny(tmp_path, "llama-gqa-tied")
    write_word_tokenizer(tmp_path, sample_text.read_text())
    ref = evaluate(model_dir=tmp_path, data=sample_text, seq_len=32, max_seqs=6, batch_seqs=4)
    dev = evaluate(model_dir=tmp_path, data=sample_text, seq_len=32, max_seqs=6, batch_seqs=4,
                   device=str(CUDA))
    assert dev.device.startswith(CUDA.type) and dev.tokens == ref.tokens
    assert abs(dev.perplexity - ref.perplexity) < 1e-4 * ref.perplexity
