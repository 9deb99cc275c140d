"""``calib_windows = "spread"``: the prior pass's windows evenly spaced over the text the prune reads,
the masks' among them spread too, drawn from the same tokens as the first windows would be."""

from __future__ import annotations

import pytest
import torch

from lowmem_bonsai.data import load_tokenizer, tokenize_file, windows
from lowmem_bonsai.errors import UserError
from lowmem_bonsai.pipeline import calibration_sets, spread_order
from lowmem_bonsai.profiles import load_profile


@pytest.mark.parametrize("available,seqs,first", [(1024, 128, 16), (11, 10, 3), (10, 10, 4), (7, 1, 1),
                                                   (500, 64, 64)])
def test_spread_order_picks_distinct_windows_evenly_and_the_first_ones_spread(available, seqs, first):
    at = spread_order(available, seqs, first)
    assert len(set(at.tolist())) == seqs and int(at.min()) == 0 and int(at.max()) <= available - 1
    if seqs > 1:
        assert int(at.max()) == available - 1  # the whole text, from its first window to its last
    gaps = torch.diff(at.sort().values)
    assert seqs == 1 or int(gaps.max()) - int(gaps.min()) <= 1  # evenly spaced
    head = at[:first].tolist()
    assert head == sorted(head)
    # the masks' windows reach as far into the text as the prior's, less one step of theirs
    assert head[-1] >= available * (first - 1) / first - available / seqs - 1


def test_spread_windows_come_from_the_span_and_the_masks_from_across_it(tiny_llama, sample_text):
    profile = load_profile("quick").replace(seq_len=16, prior_seqs=8, calib_seqs=2, reconstruct_seqs=16,
                                            reconstruct_seq_len=32, calib_windows="spread")
    assert profile.calib_span_tokens == 16 * 32
    tokens, repair = calibration_sets(tiny_llama, sample_text, profile)
    assert repair is not None  # quick repairs; the span is the repair's text either way
    ids = tokenize_file(load_tokenizer(tiny_llama), sample_text)
    assert ids.numel() > 2 * profile.calib_span_tokens  # more text than the span: spread over the span alone
    every = windows(ids[: profile.calib_span_tokens], seq_len=16)
    assert every.shape[0] == 32
    assert torch.equal(tokens, every[spread_order(32, 8, 2)])
    # the prior reads windows 0, 4, 9, 13, 18, 22, 27, 31; the masks the first and the middle one
    assert torch.equal(tokens[0], every[0]) and torch.equal(tokens[1], every[18])
    first, _ = calibration_sets(tiny_llama, sample_text, profile.replace(calib_windows="first"))
    assert torch.equal(first, every[:8])
    # without a repair the same windows: the span does not depend on whether the profile repairs
    alone, none = calibration_sets(tiny_llama, sample_text, profile.replace(reconstruct="none"))
    assert none is None and torch.equal(alone, tokens)


def test_a_text_with_fewer_windows_than_asked_gives_all_with_the_masks_spread(tiny_llama, tmp_path, caplog):
    text = tmp_path / "short.txt"
    text.write_text(" ".join(["the cat sat on the mat"] * 12), encoding="utf-8")
    profile = load_profile("quick").replace(seq_len=4, prior_seqs=64, calib_seqs=2, reconstruct="none",
                                            calib_windows="spread")
    tokens, _ = calibration_sets(tiny_llama, text, profile)
    every = windows(tokenize_file(load_tokenizer(tiny_llama), text), seq_len=4)
    n = every.shape[0]
    assert 4 <= n < 64 and tokens.shape[0] == n
    assert torch.equal(tokens, every[spread_order(n, n, 2)])  # all of them, the masks' from across the text
    assert torch.equal(tokens[1], every[round(n / 2)])
    assert "calibration windows" in caplog.text


def test_as_many_windows_as_asked_still_spread_the_masks(tiny_llama, sample_text):
    profile = load_profile("quick").replace(seq_len=16, prior_seqs=8, calib_seqs=2, reconstruct_seqs=4,
                                            reconstruct_seq_len=32, calib_windows="spread")
    assert profile.calib_span_tokens == 8 * 16  # the prior's windows are all the span
    tokens, _ = calibration_sets(tiny_llama, sample_text, profile)
    every = windows(tokenize_file(load_tokenizer(tiny_llama), sample_text)[: 8 * 16], seq_len=16)
    assert torch.equal(tokens, every[[0, 4, 1, 2, 3, 5, 6, 7]])


def test_an_unknown_choice_is_refused():
    with pytest.raises(UserError, match="calib_windows must be"):
        load_profile("quick").replace(calib_windows="random")
