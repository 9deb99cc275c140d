from __future__ import annotations

import torch

from lowmem_bonsai.checkpoint import Checkpoint
from lowmem_bonsai.forward import streamed_nll

from .conftest import make_tiny


def hf_nll(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(tokens).logits.float()  # (S, T, V)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return loss.view(tokens.shape[0], -1).sum(1).double()


def test_streamed_matches_transformers(tmp_path, family):
    model = make_tiny(tmp_path, family)
    tokens = torch.randint(0, 211, (3, 40), generator=torch.Generator().manual_seed(1))
    ckpt = Checkpoint(tmp_path)
    ours = streamed_nll(ckpt, tokens, chunk_tokens=64)[0]
    ref = hf_nll(model, tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=0)
