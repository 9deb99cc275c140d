"""Chat turns for the repair's calibration: a piece of the calibration text, cut into user and
assistant turns and written with the checkpoint's own chat template.

Why: the lsq repair keeps what its calibration tokens use, and with ``reconstruct_reselect`` it
also chooses the MLP channels by them. From plain text alone it may drop channels that only a chat
template's tokens use: SmolLM2-Instruct pruned 20 % that way ends every chat turn at once
(p(<|im_end|>) = 0.63 as the answer's first token, against 0.000 dense). Windows of the same text
written as chat turns put the template's tokens, and the dense model's answers after them, into the
moments the repair fits. ``reconstruct_chat`` is the share of the repair's windows made this way; a
checkpoint without a chat template gets plain text only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

log = logging.getLogger(__name__)

# Words per turn: a short question, a longer answer (so the template's tokens are about a fifth
# of a conversation's and the answer's text still dominates, as in a chat).
USER_WORDS = 16
ANSWER_WORDS = 64


def read_tokenizer_config(model_dir: Path) -> dict[str, Any]:
    """tokenizer_config.json, or {} where the checkpoint has none (or it cannot be read)."""
    path = Path(model_dir) / "tokenizer_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def chat_template(model_dir: Path, tc: dict[str, Any]) -> str | None:
    """The checkpoint's chat template: tokenizer_config.json's (a string, or the one named
    "default" in a list), else chat_template.jinja beside it; None where it has none."""
    template = tc.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja = Path(model_dir) / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else ""


def render(template: str, messages: list[dict[str, str]], tc: dict[str, Any], *,
           add_generation_prompt: bool = False) -> str:
    """``messages`` written by ``template`` as transformers' apply_chat_template writes them
    (a sandboxed Jinja environment; the special tokens' texts as variables)."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    tokens = {k: _token_text(v) for k, v in tc.items() if k.endswith("_token")}
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **tokens)


def conversations(text: str, template: str, tc: dict[str, Any]) -> str:
    """``text`` as consecutive conversations of one user turn (USER_WORDS words) and one assistant
    turn (the next ANSWER_WORDS), each written by ``template``."""
    words = text.split()
    step = USER_WORDS + ANSWER_WORDS
    out = []
    for i in range(0, len(words) - USER_WORDS, step):
        out.append(render(template, [
            {"role": "user", "content": " ".join(words[i:i + USER_WORDS])},
            {"role": "assistant", "content": " ".join(words[i + USER_WORDS:i + step])}], tc))
    return "".join(out)


def chat_windows(tokenizer: Tokenizer, model_dir: Path, ids: torch.Tensor, *, seq_len: int,
                 seqs: int) -> torch.Tensor | None:
    """Up to ``seqs`` windows of ``seq_len`` tokens of the text of ``ids`` written as chat turns
    (the template adds tokens, so the text fills fewer windows than ``ids`` would), or None where
    the checkpoint has no chat template or it cannot be written.  # (S, seq_len) int64
    """
    tc = read_tokenizer_config(model_dir)
    template = chat_template(model_dir, tc)
    if template is None:
        log.info("%s has no chat template: the repair's windows are plain text", model_dir)
        return None
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    try:
        chat = conversations(text, template, tc)
    except Exception as exc:  # jinja2 raises TemplateError and whatever a template's code does
        log.warning("%s: the chat template could not be written (%s): the repair's windows are plain "
                    "text", model_dir, exc)
        return None
    # added tokens (the template's markers) are matched in the text whatever add_special_tokens says
    chat_ids = torch.tensor(tokenizer.encode(chat, add_special_tokens=False).ids, dtype=torch.long)
    n = min(seqs, chat_ids.numel() // seq_len)
    if n == 0:
        return None
    return chat_ids[: n * seq_len].view(n, seq_len)
