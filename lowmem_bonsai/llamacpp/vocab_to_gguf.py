"""A checkpoint's tokenizer.json (+ tokenizer_config.json) as GGUF ``tokenizer.ggml.*`` metadata.

The reverse of :mod:`lowmem_bonsai.llamacpp.vocab_from_gguf`, and checked with it: the vocabulary is turned into
a :class:`~lowmem_bonsai.llamacpp.vocab_from_gguf.GgufVocab`, that module rebuilds what llama.cpp will do with
it, and the rebuilt tokenizer must give the checkpoint tokenizer's ids on :data:`PROBE_TEXT`.

- Byte-level BPE (GPT-2 style, GGUF model ``gpt2``): llama.cpp picks its split regexes by the
  ``tokenizer.ggml.pre`` name alone. tokenizer.json files say the same thing in different JSON
  (transformers writes ``ByteLevel(use_regex=True)`` or ``Split`` + ``ByteLevel``, our importer a
  chain of ``Split``), so instead of parsing them every pre type llama.cpp knows
  (:data:`~lowmem_bonsai.llamacpp.vocab_from_gguf.BPE_PRE_TOKENIZERS`) is tried, and the one that tokenizes the
  probe text exactly like the checkpoint wins.
- SentencePiece-style BPE with byte fallback (Llama 2, Mistral; GGUF model ``llama``): llama.cpp
  merges the best-scoring pair first, so each token scores minus the rank of the merge that makes it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ..errors import UserError
from ..chat import chat_template
from .vocab_from_gguf import (BPE_PRE_TOKENIZERS, BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED,
                         GgufVocab, tokenizer_from_vocab)

log = logging.getLogger(__name__)

# Text whose ids tell the pre types apart: digit runs of every length (gpt-2 keeps them, llama-bpe
# cuts threes, qwen2/smollm single digits), contractions in both cases, punctuation glued to words,
# whitespace runs and line breaks, several scripts. NFC-stable, so a normalizer cannot matter.
PROBE_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 1,234,567 foxes!\n"
    "DON'T SHOUT, they're HERE'S. Numbers: 7, 42, 314, 2718, 31415, 9265358979 and 3.14159.\n"
    "\n\n  Indented  text\twith\ttabs,   triple   spaces \n \r\nand CRLF.\r\n"
    "Prices: $100, €20, ¥3000 (approx.); e-mail: someone@example.com; path/to/file.txt\n"
    "Café déjà vu, naïve façade, Ελληνικά, русский язык, 東京タワー, 한국어, emoji 😀👍 ok.\n"
    "x=a+b*c/d-e; if(x>=10){return[1,2,3];}//done...\n"
    "    def f(self):\n        return {'key': \"value\"}  # comment\n"
)

# Texts where some HF tokenizers differ from anything llama.cpp can do (e.g. a Metaspace
# pre-tokenizer prepends no "▁" to text that starts with a space): a difference is only a warning.
EDGE_TEXTS = (" leading space", "  two", " ", "\n", " \n ", "trailing ")

# Pre types in the order to prefer when several tokenize the probe identically.
_PREFERENCE = ("gpt-2", "llama-bpe", "qwen2", "smollm", "starcoder", "default")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: cannot read {what} ({exc}); re-create it") from None


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json names a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _steps(obj: Any, kind: str) -> list[dict[str, Any]]:
    """The ``kind`` steps of a tokenizer.json component, looking inside Sequences."""
    if isinstance(obj, dict):
        return ([obj] if obj.get("type") == kind else []) + [
            s for v in obj.values() for s in _steps(v, kind)]
    if isinstance(obj, list):
        return [s for v in obj for s in _steps(v, kind)]
    return []


def _merges(raw: list[Any], source: str) -> list[str]:
    out = []
    for m in raw:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or not all(isinstance(p, str) and p and " " not in p for p in pair):
            raise UserError(f"{source}: merge {m!r} is not two space-free tokens; GGUF stores merges "
                            "as 'left right' strings; expected a byte-level or SentencePiece BPE")
        out.append(" ".join(pair))
    return out


def _spm_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Minus the rank of the merge producing each token: llama.cpp then merges in BPE order."""
    rank: dict[str, int] = {}
    for i, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), i)
    # Tokens no merge produces (single symbols, bytes, specials) never compete in a merge.
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def _tokens(data: dict[str, Any], *, kind: str, vocab_size: int, source: str
            ) -> tuple[list[str], list[int], dict[str, int]]:
    """One token string and type per embedding row, and text -> id of the real tokens."""
    # The model vocabulary, then added tokens (which may also be in it).
    by_id: dict[int, str] = {int(i): t for t, i in (data.get("model") or {}).get("vocab", {}).items()}
    types: dict[int, int] = {}
    for added in data.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = CONTROL if added.get("special") else USER_DEFINED
    if not by_id or max(by_id) >= vocab_size:
        raise UserError(f"{source}: tokenizer has {len(by_id)} tokens with ids up to "
                        f"{max(by_id, default=-1)}, the model's embedding {vocab_size} rows; expected "
                        "them to fit; the tokenizer belongs to another model")
    if kind == "llama":  # SentencePiece byte-fallback pieces
        types.update({i: BYTE for i, t in by_id.items() if i not in types and _BYTE_TOKEN.fullmatch(t)})
    # llama.cpp needs exactly one token per embedding row; unused rows get placeholder tokens.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, NORMAL if i in by_id else UNUSED) for i in range(vocab_size)]
    if len(set(tokens)) != len(tokens):
        log.warning("%s: duplicated token strings; llama.cpp maps text to the last id of each", source)
    return tokens, token_types, {t: i for i, t in by_id.items()}


def _special_ids(lookup: dict[str, int], tc: dict[str, Any], config: dict[str, Any], *,
                 vocab_size: int) -> dict[str, int]:
    """bos/eos/unk/pad ids: tokenizer_config.json's token strings, else config.json's ids."""
    out: dict[str, int] = {}
    for name in ("bos", "eos", "unk", "pad"):
        text = _token_text(tc.get(f"{name}_token"))
        fallback = config.get(f"{name}_token_id")
        if isinstance(fallback, list):  # several EOS ids: llama.cpp takes one
            fallback = fallback[0] if fallback else None
        if text is not None and text in lookup:
            out[name] = lookup[text]
        elif isinstance(fallback, int) and 0 <= fallback < vocab_size:
            out[name] = fallback
    return out


def _adds(hf: Tokenizer, tc: dict[str, Any], special_ids: dict[str, int]) -> tuple[bool, bool]:
    """Whether BOS / EOS go around encoded text: tokenizer_config.json's flags, else what the
    tokenizer's post-processor actually does."""
    sample = hf.encode("hello", add_special_tokens=True).ids
    grew = len(sample) > len(_encode(hf, "hello"))
    add_bos, add_eos = tc.get("add_bos_token"), tc.get("add_eos_token")
    if not isinstance(add_bos, bool):
        add_bos = grew and "bos" in special_ids and sample[0] == special_ids["bos"]
    if not isinstance(add_eos, bool):
        add_eos = grew and "eos" in special_ids and sample[-1] == special_ids["eos"]
    return add_bos, add_eos


def vocab_from_checkpoint(model_dir: Path, *, vocab_size: int,
                          config: dict[str, Any] | None = None) -> GgufVocab:
    """The checkpoint's tokenizer as GGUF vocabulary metadata, verified id for id on a probe."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; GGUF export needs the checkpoint's tokenizer.json (a fast "
                        "tokenizer); save it with transformers' tokenizer.save_pretrained")
    data = _read_json(path, "tokenizer.json")
    try:
        hf = Tokenizer.from_str(json.dumps(data))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise UserError(f"{path}: not a valid tokenizer.json ({exc})") from None
    tc_path = model_dir / "tokenizer_config.json"
    tc = _read_json(tc_path, "tokenizer_config.json") if tc_path.is_file() else {}
    model = data.get("model") or {}
    source = str(path)
    if model.get("type") != "BPE":
        raise UserError(f"{source}: tokenizer model '{model.get('type')}' is not supported; expected "
                        "BPE (byte-level like GPT-2/Llama 3/Qwen2, or SentencePiece-style like Llama 2)")
    byte_level = bool(_steps([data.get("pre_tokenizer"), data.get("decoder")], "ByteLevel"))
    if byte_level:
        kind = "gpt2"
    elif model.get("byte_fallback"):
        kind = "llama"
    else:
        raise UserError(f"{source}: a BPE tokenizer that is neither byte-level nor byte-fallback; "
                        "llama.cpp has no equivalent; expected a GPT-2 or SentencePiece-style BPE")

    tokens, token_types, lookup = _tokens(data, kind=kind, vocab_size=vocab_size, source=source)
    special_ids = _special_ids(lookup, tc, config or {}, vocab_size=vocab_size)
    if kind == "llama" and "unk" in special_ids:
        token_types[special_ids["unk"]] = UNKNOWN
    add_bos, add_eos = _adds(hf, tc, special_ids)

    merges = _merges(model.get("merges", []), source)
    base = dict(model=kind, tokens=tokens, token_types=token_types, merges=merges,
                special_ids=special_ids, add_bos=add_bos, add_eos=add_eos,
                chat_template=chat_template(model_dir, tc))
    want = _encode(hf, PROBE_TEXT)
    if kind == "llama":
        # The "▁" llama.cpp puts before the text: a Prepend normalizer (legacy Llama files) or a
        # Metaspace pre-tokenizer that prepends (newer ones).
        prefix = bool(_steps(data.get("normalizer"), "Prepend")) or any(
            m.get("prepend_scheme", "always") != "never" and m.get("add_prefix_space", True)
            for m in _steps(data.get("pre_tokenizer"), "Metaspace"))
        vocab = GgufVocab(pre="default", scores=_spm_scores(tokens, merges), add_space_prefix=prefix,
                          **base)
        got = _encode(tokenizer_from_vocab(vocab)[0], PROBE_TEXT)
        if got != want:
            raise UserError(f"{source}: llama.cpp would tokenize this SentencePiece vocabulary "
                            f"differently (first difference at token {_first_diff(got, want)}); "
                            "expected identical ids; convert it with llama.cpp's convert_hf_to_gguf.py")
    else:
        vocab = _pick_pre(base, want, tc=tc, ignore_merges=bool(model.get("ignore_merges")),
                          source=source)
    rebuilt = tokenizer_from_vocab(vocab)[0]
    differ = [t for t in EDGE_TEXTS if _encode(rebuilt, t) != _encode(hf, t)]
    if differ:
        log.warning("%s: llama.cpp will tokenize %s differently from this tokenizer.json (a "
                    "quirk llama.cpp cannot reproduce); other text is identical", source,
                    ", ".join(repr(t) for t in differ))
    return vocab


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _pick_pre(base: dict[str, Any], want: list[int], *, tc: dict[str, Any], ignore_merges: bool,
              source: str) -> GgufVocab:
    """The llama.cpp pre type that reproduces the checkpoint's ids on the probe text."""
    seen: list[Any] = []
    matches: list[str] = []
    names = sorted(BPE_PRE_TOKENIZERS, key=lambda p: _PREFERENCE.index(p) if p in _PREFERENCE else 99)
    for pre in names:
        spec = BPE_PRE_TOKENIZERS[pre]
        if spec in seen:  # aliases (llama3, llama-v3) behave exactly like an earlier name
            continue
        seen.append(spec)
        vocab = GgufVocab(pre=pre, scores=None, add_space_prefix=False, **base)
        if _encode(tokenizer_from_vocab(vocab)[0], PROBE_TEXT) == want:
            matches.append(pre)
    if not matches:
        raise UserError(f"{source}: no pre-tokenizer llama.cpp knows ({', '.join(names)}) splits text "
                        "like this tokenizer.json; expected one of them; add the missing one to "
                        "BPE_PRE_TOKENIZERS in lowmem_bonsai/llamacpp/vocab_from_gguf.py")
    # Equal ids on the probe (the vocabulary cannot tell them apart there): prefer the one that
    # also treats whole-word tokens (ignore_merges) and decoded spaces like the checkpoint.
    clean = tc.get("clean_up_tokenization_spaces")
    pre = min(matches, key=lambda p: (BPE_PRE_TOKENIZERS[p].ignore_merges != ignore_merges,
                                      BPE_PRE_TOKENIZERS[p].clean_spaces != clean))
    log.info("%s: tokenizer pre type '%s' (matching: %s)", source, pre, ", ".join(matches))
    return GgufVocab(pre=pre, scores=None, add_space_prefix=False, **base)


def write_vocab(writer: Any, v: GgufVocab) -> None:
    """Add ``v`` to a ``gguf.GGUFWriter`` as the ``tokenizer.ggml.*`` keys llama.cpp reads."""
    writer.add_tokenizer_model(v.model)
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.token_types)
    if v.scores is not None:
        writer.add_token_scores(v.scores)
    if v.merges:
        writer.add_token_merges(v.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
              "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for name, token_id in v.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(bool(v.add_bos))
    writer.add_add_eos_token(bool(v.add_eos))
    if v.model == "llama":
        writer.add_add_space_prefix(v.add_space_prefix)
    if v.chat_template is not None:
        writer.add_chat_template(v.chat_template)
