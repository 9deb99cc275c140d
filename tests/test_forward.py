from __future__ import annotations

import torch

from lowmem_bonsai.model.checkpoint import Checkpoint
from lowmem_bonsai.engine.forward import streamed_nll, streamed_pass

from .conftest import hf_nll, make_tiny


def test_streamed_matches_transformers(tmp_path, family):
    model = make_tiny(tmp_path, family)
    tokens = torch.randint(0, 211, (3, 40), generator=torch.Generator().manual_seed(1))
    ckpt = Checkpoint(tmp_path)
    ours = streamed_nll(ckpt, tokens, chunk_tokens=64)[0]
    ref = hf_nll(model, tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=0)


def test_soft_targets_against_transformers(tmp_path):
    """Teacher top-k equals transformers' top-k; cross-entropy to it equals the formula on full logits."""
    model = make_tiny(tmp_path, "llama-gqa-tied")
    tokens = torch.randint(0, 211, (2, 30), generator=torch.Generator().manual_seed(2))
    ckpt = Checkpoint(tmp_path)
    # Tiny LOGIT_BUDGET chunks: the vocab arrives in many ranges, so the running top-k is exercised.
    import lowmem_bonsai.engine.forward as fw
    old, fw.LOGIT_BUDGET = fw.LOGIT_BUDGET, 2000
    try:
        first = streamed_pass(ckpt, tokens, chunk_tokens=64, want_teacher=True, top_k=8)
        hard, soft = first.nll[0], first.teacher
        ce = streamed_nll(ckpt, tokens, chunk_tokens=64, soft=soft)[0]
    finally:
        fw.LOGIT_BUDGET = old
    with torch.no_grad():
        logits = model(tokens).logits.float()[:, :-1]  # (S, T-1, V)
    logp = logits.log_softmax(-1)
    ref_val, ref_id = logits.topk(8, dim=-1)
    assert torch.equal(soft.ids.sort(-1).values, ref_id.sort(-1).values)
    ref_probs = ref_val.softmax(-1)  # top-k renormalised
    torch.testing.assert_close(soft.probs.gather(-1, soft.ids.argsort(-1)),
                               ref_probs.gather(-1, ref_id.argsort(-1)), rtol=1e-4, atol=1e-6)
    ref_ce = -(ref_probs * logp.gather(-1, ref_id)).sum(-1).sum(-1).double()
    torch.testing.assert_close(ce, ref_ce, rtol=1e-4, atol=0)
    torch.testing.assert_close(hard, hf_nll(model, tokens), rtol=1e-4, atol=0)
