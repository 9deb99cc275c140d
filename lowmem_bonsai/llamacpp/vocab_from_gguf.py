"""Hugging Face tokenizer rebuilt from a GGUF's ``tokenizer.ggml.*`` metadata.

The goal is the same ids as llama.cpp for the same text, so the rebuilt tokenizer mirrors what
llama.cpp does with the vocabulary rather than what the original tokenizer.json might have said:

- ``gpt2`` (byte-level BPE): llama.cpp splits the text with a list of regexes chosen by
  ``tokenizer.ggml.pre``; each regex splits the pieces of the previous one and keeps the text
  between matches as pieces of their own. That is a chain of ``Split(..., "isolated")``
  pre-tokenizers, then byte-level encoding, then BPE with the GGUF's merges.
- ``llama`` (SentencePiece): llama.cpp merges the highest-scoring adjacent pair first and falls back
  to ``<0xXX>`` byte tokens; that is BPE with merges ranked by the score of the merged piece, byte
  fallback, and the ``▁`` space escape. (Pieces of equal score may merge in a different order than
  llama.cpp's leftmost-first; vocabularies with distinct scores, like Llama 2's, are unaffected.)

Token types follow llama.cpp: CONTROL and UNKNOWN tokens are matched in text only when special
tokens are parsed (HF: special added tokens), USER_DEFINED tokens always (HF: non-special added
tokens). To reproduce llama.cpp's ``tokenize(..., special=False)`` set
``tokenizer.encode_special_tokens = True``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors

from ..errors import UserError

log = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The GPT-2 split regex as llama.cpp writes it (no trailing `\s+`: the text it would match is kept
# as an unmatched piece by the "isolated" split anyway).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True, slots=True)
class BpePreTokenizer:
    """How llama.cpp prepares text for one ``tokenizer.ggml.pre`` value."""

    regexes: tuple[str, ...]  # applied in order, each one splitting the pieces of the previous
    ignore_merges: bool  # a piece that is itself a token is emitted whole, merges or not
    clean_spaces: bool  # decode-side cleanup (HF clean_up_tokenization_spaces)
    add_bos: bool  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


# Keyed by the GGUF `tokenizer.ggml.pre` strings llama.cpp accepts (src/llama-vocab.cpp); the regex
# lists are that file's, per pre type. Extend by adding a row after checking ids against llama.cpp.
BPE_PRE_TOKENIZERS: dict[str, BpePreTokenizer] = {
    "default": BpePreTokenizer(
        (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False, True, False),
    "gpt-2": BpePreTokenizer((_GPT2,), False, True, False),
    # SmolLM, StarCoder: every digit on its own, then GPT-2.
    "smollm": BpePreTokenizer((r"\p{N}", _GPT2), False, False, False),
    "starcoder": BpePreTokenizer((r"\p{N}", _GPT2), False, True, False),
    "llama-bpe": BpePreTokenizer((_LLAMA3,), True, True, True),
    "llama3": BpePreTokenizer((_LLAMA3,), True, True, True),
    "llama-v3": BpePreTokenizer((_LLAMA3,), True, True, True),
    "qwen2": BpePreTokenizer((_QWEN2,), False, False, False),
}

SUPPORTED_MODELS = ("gpt2", "llama")


def _get(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


@dataclass(frozen=True, slots=True)
class GgufVocab:
    """The ``tokenizer.ggml.*`` keys, read once."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]  # one per token; NORMAL where the GGUF has no types
    scores: list[float] | None
    merges: list[str] | None
    special_ids: dict[str, int]  # "bos", "eos", "unk", "pad" -> id, only those present
    add_bos: bool | None
    add_eos: bool | None
    add_space_prefix: bool
    chat_template: str | None

    @classmethod
    def read(cls, reader: gguf.GGUFReader) -> GgufVocab:
        tokens = _get(reader, "tokenizer.ggml.tokens")
        model = _get(reader, "tokenizer.ggml.model")
        if model is None or tokens is None:
            raise UserError(
                "GGUF has no tokenizer (tokenizer.ggml.model/tokens missing); expected an embedded "
                "vocabulary as llama.cpp's converter writes it; convert the model with "
                "convert_hf_to_gguf.py from its Hugging Face folder"
            )
        types = _get(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise UserError(f"GGUF has {len(types)} token types for {len(tokens)} tokens; expected "
                            "one per token; the file is corrupt, re-download or re-convert it")
        special_ids = {}
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                          ("unk", "unknown_token_id"), ("pad", "padding_token_id")):
            value = _get(reader, f"tokenizer.ggml.{key}")
            if value is not None and 0 <= int(value) < len(tokens):
                special_ids[name] = int(value)
        return cls(
            model=str(model),
            pre=str(_get(reader, "tokenizer.ggml.pre", "default")),
            tokens=list(tokens),
            token_types=[int(t) for t in types],
            scores=_get(reader, "tokenizer.ggml.scores"),
            merges=_get(reader, "tokenizer.ggml.merges"),
            special_ids=special_ids,
            add_bos=_get(reader, "tokenizer.ggml.add_bos_token"),
            add_eos=_get(reader, "tokenizer.ggml.add_eos_token"),
            add_space_prefix=bool(_get(reader, "tokenizer.ggml.add_space_prefix", True)),
            chat_template=_get(reader, "tokenizer.chat_template"),
        )


def _vocab_dict(tokens: list[str]) -> dict[str, int]:
    # llama.cpp's text->id map keeps the last id of a duplicated string; do the same.
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        log.warning("GGUF vocabulary has %d duplicated token strings; the last id of each wins, as "
                    "in llama.cpp", len(tokens) - len(vocab))
    return vocab


def _byte_level_bpe(v: GgufVocab) -> tuple[Tokenizer, BpePreTokenizer]:
    spec = BPE_PRE_TOKENIZERS.get(v.pre)
    if spec is None:
        raise UserError(
            f"GGUF tokenizer pre-type '{v.pre}' is not supported; expected one of "
            f"{', '.join(sorted(BPE_PRE_TOKENIZERS))}; add its llama.cpp regexes to "
            "BPE_PRE_TOKENIZERS in lowmem_bonsai/llamacpp/vocab_from_gguf.py"
        )
    if not v.merges:
        raise UserError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges; expected the BPE "
                        "merges; re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    merges = []
    for m in v.merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise UserError(f"GGUF merge {m!r} is not two tokens separated by a space; the file is "
                            "corrupt, re-download or re-convert it")
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=_vocab_dict(v.tokens), merges=merges,
                               ignore_merges=spec.ignore_merges))
    # Split on the original text, then map bytes to the GPT-2 alphabet: llama.cpp's order.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok, spec


def _spm_merges(v: GgufVocab, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges equivalent to llama.cpp's SPM loop: the pair whose union scores best merges first."""
    assert v.scores is not None
    ranked: list[tuple[float, int, str, str]] = []
    for piece, pid in vocab.items():
        if v.token_types[pid] != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(v.scores[pid]), pid, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def _sentencepiece_bpe(v: GgufVocab) -> Tokenizer:
    if v.scores is None or len(v.scores) != len(v.tokens):
        raise UserError("GGUF llama (SentencePiece) tokenizer lacks one tokenizer.ggml.scores "
                        "entry per token; expected them; re-convert the model with "
                        "convert_hf_to_gguf.py")
    vocab = _vocab_dict(v.tokens)
    unk = v.tokens[v.special_ids["unk"]] if "unk" in v.special_ids else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(v, vocab), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    # llama.cpp escapes spaces as U+2581 and prefixes one to every text run that starts the input or
    # follows a special token; the HF normalizer runs once per such run, so Prepend matches.
    steps = [normalizers.Prepend("▁")] if v.add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if v.add_space_prefix else [])
    )
    return tok


def _post_processor(tok: Tokenizer, v: GgufVocab, *, add_bos: bool, add_eos: bool) -> None:
    """Add BOS/EOS around encoded text, as llama.cpp does when the GGUF asks for it."""
    if not (add_bos or add_eos):
        return
    ends = {k: v.tokens[v.special_ids[k]] for k, on in (("bos", add_bos), ("eos", add_eos)) if on}
    bos, eos = [ends[k] for k in ends if k == "bos"], [ends[k] for k in ends if k == "eos"]
    single = bos + ["$A"] + eos
    pair = single + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos]
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, v.special_ids[k]) for k, t in ends.items()])


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> tuple[Tokenizer, dict[str, Any]]:
    """The GGUF's vocabulary as a ``tokenizers.Tokenizer``, plus tokenizer_config.json content."""
    arch = _get(reader, "general.architecture", "llama")
    context = _get(reader, f"{arch}.context_length")
    return tokenizer_from_vocab(GgufVocab.read(reader),
                               model_max_length=None if context is None else int(context))


def tokenizer_from_vocab(v: GgufVocab, *, model_max_length: int | None = None
                         ) -> tuple[Tokenizer, dict[str, Any]]:
    """What llama.cpp would do with ``v``, as a ``tokenizers.Tokenizer`` and its config."""
    if v.model == "gpt2":
        tok, spec = _byte_level_bpe(v)
        add_bos_default, clean_spaces = spec.add_bos, spec.clean_spaces
    elif v.model == "llama":
        tok = _sentencepiece_bpe(v)
        add_bos_default, clean_spaces = True, False
    else:
        raise UserError(
            f"GGUF tokenizer model '{v.model}' is not supported; expected one of "
            f"{', '.join(SUPPORTED_MODELS)}; convert the tokenizer from the original Hugging Face "
            "checkpoint instead"
        )
    add_bos = bool(v.add_bos) if v.add_bos is not None else add_bos_default
    add_eos = bool(v.add_eos) if v.add_eos is not None else False
    for flag, key in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and key not in v.special_ids:
            raise UserError(f"GGUF asks to add a {key} token but has no valid "
                            f"tokenizer.ggml.{key}_token_id; the file is corrupt, re-convert it")

    added = [AddedToken(text, special=kind != USER_DEFINED, normalized=False)
             for text, kind in zip(v.tokens, v.token_types) if kind in (UNKNOWN, CONTROL, USER_DEFINED)]
    # add_tokens keeps the ids of strings already in the model vocabulary, which all of these are.
    tok.add_tokens(added)
    _post_processor(tok, v, add_bos=add_bos, add_eos=add_eos)

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name in ("bos", "eos", "unk", "pad"):
        if name in v.special_ids:
            config[f"{name}_token"] = v.tokens[v.special_ids[name]]
    config["add_bos_token"] = add_bos
    config["add_eos_token"] = add_eos
    config["clean_up_tokenization_spaces"] = clean_spaces
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if v.chat_template is not None:
        config["chat_template"] = v.chat_template
    log.info("tokenizer: %s/%s, %d tokens, %d added", v.model, v.pre, len(v.tokens), len(added))
    return tok, config
