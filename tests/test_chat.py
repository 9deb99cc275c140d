"""The repair's chat windows (lowmem_bonsai/chat.py): templates written as transformers writes them,
the share of windows replaced, only the replaced windows' text, and plain text where no template."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast

from lowmem_bonsai.chat import chat_template, conversations, read_tokenizer_config, render
from lowmem_bonsai.data import load_tokenizer, tokenize_file
from lowmem_bonsai.errors import UserError
from lowmem_bonsai.pipeline import calibration_sets, first_windows, repair_windows
from lowmem_bonsai.profiles import load_profile

from .conftest import DELETE, edit_json

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-2's: the BOS token's text, whitespace control, raise_exception on a wrong order
LLAMA2 = ("{{ bos_token }}{% for message in messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
          "{% endif %}\n  {% if message['role'] == 'user' %}"
          "{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
          "{% endif %}\n{% endfor %}")


def with_template(model_dir, template, **tokens) -> None:
    """Give the checkpoint's word tokenizer ChatML's markers and ``template``."""
    tok = load_tokenizer(model_dir)
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, **tokens}))


@pytest.mark.parametrize("template", [CHATML, LLAMA2], ids=["chatml", "llama2"])
def test_render_writes_what_transformers_writes(tiny_llama, template):
    tokens = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}
    with_template(tiny_llama, template, **tokens)
    messages = [{"role": "user", "content": " the first question"},
                {"role": "assistant", "content": "an answer , two sentences . "}]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tiny_llama / "tokenizer.json"), bos_token="<s>",
                                 eos_token="</s>", chat_template=template)
    want = hf.apply_chat_template(messages, tokenize=False)
    tc = read_tokenizer_config(tiny_llama)
    assert render(chat_template(tiny_llama, tc), messages, tc) == want
    if template is LLAMA2:  # the template's own error reaches the caller (who falls back to plain)
        with pytest.raises(Exception, match="must alternate"):
            render(template, messages[::-1], tc)


def test_conversations_cut_the_text_into_turns():
    words = [f"w{i}" for i in range(200)]
    out = conversations(" ".join(words), CHATML, {})
    # 16 + 64 words each: two whole conversations and a third with 16 + 24
    assert out.count("<|im_start|>user\n") == 3 and out.count("<|im_start|>assistant\n") == 3
    assert out.count("<|im_start|>system\n") == 3
    got = [w for w in out.replace("<|im_end|>", " ").split() if w.startswith("w")]
    assert got == words  # every word once, in order


def plain_and_chat(model_dir, text, share: float, reconstruct_seqs: int = 16, extra: bool = False):
    profile = load_profile("quick").replace(reconstruct_seqs=reconstruct_seqs, reconstruct_seq_len=64,
                                            reconstruct_chat=share, reconstruct_chat_extra=extra)
    tok = load_tokenizer(model_dir)
    ids = tokenize_file(tok, text)
    plain = first_windows(ids, text, seq_len=64, seqs=reconstruct_seqs)
    return tok, ids, plain, repair_windows(tok, model_dir, ids, text, profile)


def test_a_share_of_the_windows_becomes_chat_turns_of_their_own_text(tiny_llama, sample_text):
    with_template(tiny_llama, CHATML)
    tok, ids, plain, got = plain_and_chat(tiny_llama, sample_text, 0.25)
    assert got.shape == plain.shape == (16, 64)
    assert torch.equal(got[:12], plain[:12])  # the first 75 % as they were
    start, end = (tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>"))
    chat = got[12:]
    assert int((chat == start).sum()) >= 4 and int((chat == end).sum()) >= 4
    assert not torch.equal(chat, plain[12:])
    # its words are the replaced windows' words, in order: no text past the repair's windows
    words = [i for i in chat.reshape(-1).tolist() if i not in (start, end)]
    replaced = plain[12:].reshape(-1).tolist()
    template_words = set(tok.encode("system\nYou are a helpful assistant user assistant").ids)
    text_words = [i for i in words if i not in template_words]
    it = iter(replaced)
    assert all(any(w == r for r in it) for w in text_words)  # a subsequence of the replaced text
    assert len(text_words) > 0.5 * len(replaced)


def test_extra_chat_windows_come_on_top_of_every_plain_window(tiny_llama, sample_text):
    with_template(tiny_llama, CHATML)
    _, _, _, instead = plain_and_chat(tiny_llama, sample_text, 0.25)
    _, _, plain, got = plain_and_chat(tiny_llama, sample_text, 0.25, extra=True)
    assert torch.equal(got[:16], plain)  # every plain window kept
    # the chat windows are the same ones that would have replaced the last quarter
    assert torch.equal(got[16:], instead[12:]) and got.shape[0] == 16 + instead.shape[0] - 12
    edit_json(tiny_llama / "tokenizer_config.json", chat_template=DELETE)  # no template: plain only
    _, _, plain, got = plain_and_chat(tiny_llama, sample_text, 0.25, extra=True)
    assert torch.equal(got, plain)


def test_no_share_or_no_template_is_plain_text(tiny_llama, sample_text, caplog):
    _, _, plain, got = plain_and_chat(tiny_llama, sample_text, 0.5)  # no template
    assert torch.equal(got, plain)
    with_template(tiny_llama, CHATML)
    _, _, plain, got = plain_and_chat(tiny_llama, sample_text, 0.0)
    assert torch.equal(got, plain)
    edit_json(tiny_llama / "tokenizer_config.json", chat_template="{{ raise_exception('no') }}")
    with caplog.at_level(logging.WARNING):
        _, _, plain, got = plain_and_chat(tiny_llama, sample_text, 0.5)
    assert torch.equal(got, plain)
    assert "could not be written" in caplog.text


def test_calibration_sets_give_the_repair_its_chat_windows(tiny_llama, sample_text):
    with_template(tiny_llama, CHATML)
    profile = load_profile("quick").replace(reconstruct_seqs=8, reconstruct_seq_len=64, reconstruct_chat=0.5,
                                            reconstruct="lsq")
    tokens, repair = calibration_sets(tiny_llama, sample_text, profile)
    _, _, _, want = plain_and_chat(tiny_llama, sample_text, 0.5, reconstruct_seqs=8,
                                   extra=profile.reconstruct_chat_extra)
    assert torch.equal(repair, want) and tokens.shape[1] == profile.seq_len


def test_a_share_outside_0_1_is_refused():
    with pytest.raises(UserError, match="reconstruct_chat must be in"):
        load_profile("quick").replace(reconstruct_chat=1.5)


def test_estimate_counts_chat_windows_only_where_there_is_a_template(tiny_llama):
    from lowmem_bonsai.estimate import estimate

    profile = load_profile("quick").replace(reconstruct_seqs=16, reconstruct_seq_len=64, reconstruct_chat=0.25,
                                            reconstruct_chat_extra=False)
    plain = estimate(model_dir=tiny_llama, profile=profile, sparsity=0.2, measure_seconds=0.01)
    assert plain["reconstruction"]["chat_windows"] == 0  # no chat template: plain text
    with_template(tiny_llama, CHATML)
    chat = estimate(model_dir=tiny_llama, profile=profile, sparsity=0.2, measure_seconds=0.01)
    assert chat["reconstruction"]["chat_windows"] == 4 and chat["reconstruction"]["windows"] == 16
    extra = estimate(model_dir=tiny_llama, profile=profile.replace(reconstruct_chat_extra=True), sparsity=0.2,
                     measure_seconds=0.01)
    assert extra["reconstruction"]["chat_windows"] == 4 and extra["reconstruction"]["windows"] == 20
    assert extra["reconstruction"]["forward_tokens"] == chat["reconstruction"]["forward_tokens"] * 20 // 16
    assert extra["memory"]["reconstruction_gb"] > chat["memory"]["reconstruction_gb"]
    none = estimate(model_dir=tiny_llama, profile=profile.replace(reconstruct="none"), sparsity=0.2,
                    measure_seconds=0.01)["reconstruction"]  # no repair reads no windows
    assert (none["chat_windows"], none["windows"], none["repairs"], none["forward_tokens"]) == (0, 0, 0, 0)
