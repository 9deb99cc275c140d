"""GGUF -> Hugging Face import: exact round trips of tiny models, refusals, and the real SmolLM2.

Tiny models are written to GGUF here with gguf-py, the way llama.cpp's converter lays them out
(q/k rows permuted, ggml names), with a byte-level BPE vocabulary trained on the spot. Where
llama-cpp-python is installed, rebuilt tokenizers are checked id for id against llama.cpp.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem_bonsai import gguf_import
from lowmem_bonsai.errors import UserError
from lowmem_bonsai.gguf_import import import_gguf
from lowmem_bonsai.gguf_vocab import tokenizer_from_gguf

from .conftest import WIKITEXT

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed")

CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 2024, and we'll see 1,234 foxes! "
    "Don't they're here? In 1999 the model had 3.14 points; THE END.\n\n"
    "  Indented line with  two spaces\tand a tab.\r\nCafé déjà vu, naïve façade, 東京 and Ελληνικά.\n"
) * 3
ODD = ["", " ", "  ", "\n", "\n\n\n", " \n ", "0123456789", "3.14159 and 1,000,000",
       "héllo wörld ñ 日本語 한국어 Ελληνικά", "emoji 😀👍🏽 🇫🇷", "tabs\tand\r\nCRLF",
       "multiple    spaces   here  ", "don't I'll WE'RE", "\u00a0nbsp\u2009thin\u3000ideo",
       "a\u0301 combining", "x" * 200, "\u200bzero\ufeffwidth"]
SPECIALS = {"<|endoftext|>": gguf.TokenType.CONTROL, "<|im_start|>": gguf.TokenType.CONTROL,
            "<tool>": gguf.TokenType.USER_DEFINED}
CHAT_ODD = ["<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|>", "a<tool>b", "<|im_start|> x"]


# --- writing tiny GGUFs ------------------------------------------------------------------------

def gguf_names(layers: int) -> dict[str, str]:
    """HF -> GGUF names, written out by hand (independent of the table under test)."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight",
                 "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight",
                 "self_attn.o_proj.weight": "attn_output.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight", "self_attn.q_proj.bias": "attn_q.bias",
                 "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
                 "self_attn.o_proj.bias": "attn_output.bias"}
    for i in range(layers):
        names.update({f"model.layers.{i}.{k}": f"blk.{i}.{v}" for k, v in per_layer.items()})
    return names


def permute(w: np.ndarray, n: int) -> np.ndarray:
    """llama.cpp's converter order for q/k rows: halves of each head interleaved."""
    d = w.shape[0] // n
    return w.reshape(n, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_level_vocab() -> tuple[Tokenizer, list[str], list[str], list[int]]:
    """A ~300-token GPT-2 style BPE trained on CORPUS: (tokenizer, tokens, merges, token types)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([CORPUS], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    types = [int(SPECIALS.get(t, gguf.TokenType.NORMAL)) for t in tokens]
    return tok, tokens, [" ".join(m) for m in model["merges"]], types


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, pieces scored by rank."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator([CORPUS], trainer=trainers.BpeTrainer(vocab_size=200,
                                                                   show_progress=False))
    pieces = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def tiny_model(*, tied: bool, vocab: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    kwargs = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**(kwargs | overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # ones would hide swapped norms
            elif name.endswith("bias"):
                p.normal_(0, 0.1)  # default init zeroes biases, which would hide a bias bug
    return model


def write_gguf(path: Path, model: LlamaForCausalLM | None = None, *, arch: str = "llama",
               qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
               tokenizer: str = "gpt2", pre: str = "gpt-2", n_heads_meta: int | None = None,
               extra: dict[str, np.ndarray] | None = None, skip: tuple[str, ...] = ()) -> Path:
    """Write ``model`` (default: a tiny untied one) as llama.cpp's converter would."""
    if tokenizer == "gpt2":
        _, tokens, merges, types = byte_level_vocab()
    else:
        tokens, scores, types = spm_vocab()
    model = model or tiny_model(tied=False, vocab=len(tokens))
    c = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(n_heads_meta or c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if tokenizer == "gpt2":
        w.add_tokenizer_pre(pre)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokens.index("<|im_start|>"))
        w.add_eos_token_id(tokens.index("<|endoftext|>"))
        w.add_add_bos_token(False)
    else:
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    names = gguf_names(c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings or names[name] in skip:
            continue
        a = t.float().numpy()
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            a = permute(a, c.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            a = permute(a, c.num_key_value_heads)
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(names[name], gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(names[name], a)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_checkpoint(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def assert_nothing_left(tmp_path: Path, out: Path) -> None:
    assert not out.exists() or not any(out.iterdir())
    assert not list(tmp_path.glob(f".{out.name}.partial*"))


# --- tiny round trips --------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_f32_round_trip_is_exact(tmp_path, tied):
    _, tokens, _, _ = byte_level_vocab()
    model = tiny_model(tied=tied, vocab=len(tokens))
    src = write_gguf(tmp_path / "tiny.gguf", model)
    # A small shard cap forces several shards and an index.
    out = import_gguf(gguf_path=src, out_dir=tmp_path / "hf", dtype="float32",
                      max_shard_bytes=64 * 1024)
    assert (out / "model.safetensors.index.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert (cfg["vocab_size"], cfg["rms_norm_eps"], cfg["rope_theta"]) == (len(tokens), 1e-5, 1e4)
    got = read_checkpoint(out)
    want = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name

    loaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings is tied
    ids = torch.randint(0, len(tokens), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


def test_biases_and_llama3_rope(tmp_path):
    """q/k biases get unpermuted, a missing bias becomes zeros, rope_freqs becomes rope_scaling."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, tokens, _, _ = byte_level_vocab()
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model = tiny_model(tied=True, vocab=len(tokens), attention_bias=True, rope_theta=500000.0,
                       rope_scaling=dict(rope), max_position_embeddings=16384)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.bias.zero_()  # the GGUF below has no attn_output.bias
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")  # (head_dim/2,)
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    freqs = (plain / scaled.double()).float().numpy()  # llama.cpp divides by these factors
    src = write_gguf(tmp_path / "b.gguf", model, extra={"rope_freqs.weight": freqs},
                     skip=("blk.0.attn_output.bias", "blk.1.attn_output.bias"))
    out = import_gguf(gguf_path=src, out_dir=tmp_path / "hf", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["rope_scaling"] == rope
    assert cfg["rope_theta"] == 500000.0
    loaded = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, len(tokens), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


def test_q8_0_round_trip_within_quantization_error(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_import, "_ROWS_PER_CHUNK", 7)  # several chunks, one ragged
    _, tokens, _, _ = byte_level_vocab()
    model = tiny_model(tied=False, vocab=len(tokens))
    src = write_gguf(tmp_path / "q8.gguf", model, qtype=gguf.GGMLQuantizationType.Q8_0)
    out = import_gguf(gguf_path=src, out_dir=tmp_path / "hf", dtype="float32")
    got = read_checkpoint(out)
    for name, t in model.state_dict().items():
        if t.ndim == 1:
            assert torch.equal(got[name], t), name  # norms stay F32
            continue
        # Q8_0: per 32 values, scale = max|x| / 127 stored in fp16: rounding to the int8 grid costs
        # scale / 2, the fp16 scale up to 127 * scale * 2**-11 more.
        scale = t.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
        err = (got[name] - t).reshape(-1, 32).abs()
        assert (err <= scale * (0.5 + 127 * 2**-11)).all(), name
        assert not torch.equal(got[name], t), name  # it really went through Q8_0


def test_dtype_and_tokenizer_files(tmp_path):
    hf_tok, tokens, _, _ = byte_level_vocab()
    src = write_gguf(tmp_path / "tiny.gguf")
    out = import_gguf(gguf_path=src, out_dir=tmp_path / "hf", dtype="bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in read_checkpoint(out).values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tc["bos_token"], tc["eos_token"], tc["add_bos_token"]) == (
        "<|im_start|>", "<|endoftext|>", False)
    assert tc["model_max_length"] == 128
    rebuilt = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in [CORPUS, *ODD]:
        assert rebuilt.encode(text).ids == hf_tok.encode(text).ids, repr(text)
        assert rebuilt.decode(rebuilt.encode(text).ids) == text
    ids = rebuilt.encode("<|im_start|>hi<tool>").ids
    assert (ids[0], ids[-1]) == (tokens.index("<|im_start|>"), tokens.index("<tool>"))


def _llama_cpp_ids(path: Path, texts: list[str]) -> dict[tuple[str, bool], list[int]]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return {(t, s): llm.tokenize(t.encode(), add_bos=False, special=s)
            for t in texts for s in (False, True)}


def _check_against_llama_cpp(path: Path, texts: list[str]) -> None:
    tok, _ = tokenizer_from_gguf(gguf.GGUFReader(path))
    ref = _llama_cpp_ids(path, texts)
    for (text, special), want in ref.items():
        tok.encode_special_tokens = not special  # llama.cpp special=False: control tokens are text
        assert tok.encode(text, add_special_tokens=False).ids == want, (text[:80], special)


@needs_llama_cpp
@pytest.mark.parametrize("pre", ["gpt-2", "default", "llama-bpe", "qwen2", "smollm"])
def test_tiny_bpe_tokenizer_matches_llama_cpp(tmp_path, pre):
    path = write_gguf(tmp_path / "tiny.gguf", pre=pre)
    _check_against_llama_cpp(path, [CORPUS, *ODD, *CHAT_ODD])


@needs_llama_cpp
def test_tiny_sentencepiece_tokenizer_matches_llama_cpp(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", tokenizer="llama")
    _check_against_llama_cpp(path, [CORPUS, *ODD, "<s>hello</s> world", "a <s> b"])


def test_sentencepiece_tokenizer_round_trips_text(tmp_path):
    tok, cfg = tokenizer_from_gguf(gguf.GGUFReader(write_gguf(tmp_path / "spm.gguf",
                                                              tokenizer="llama")))
    assert (cfg["add_bos_token"], cfg["bos_token"], cfg["unk_token"]) == (True, "<s>", "<unk>")
    ids = tok.encode("Café 東京 fox").ids
    assert ids[0] == 1  # add_bos via the post-processor
    assert tok.decode(ids) == "Café 東京 fox"


# --- refusals ----------------------------------------------------------------------------------

def _refused(tmp_path: Path, src: Path, match: str, **kwargs) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match) as info:
        import_gguf(gguf_path=src, out_dir=out, **kwargs)
    assert "\n" not in str(info.value)
    assert_nothing_left(tmp_path, out)


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 a zip, not a model")
    _refused(tmp_path, tmp_path / "x.gguf", "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _refused(tmp_path, tmp_path / "empty.gguf", "not a GGUF file")
    _refused(tmp_path, tmp_path / "missing.gguf", "no such file")


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_gguf(tmp_path, keep):
    data = write_gguf(tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * keep)])
    _refused(tmp_path, tmp_path / "cut.gguf", "truncated or corrupt")


def test_unsupported_arch(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _refused(tmp_path, tmp_path / "gpt2.gguf", r"architecture 'gpt2' is not supported.*llama")


def test_unmapped_tensor_is_named(tmp_path):
    extra = {"blk.0.attn_sinks.weight": np.zeros(4, np.float32)}
    src = write_gguf(tmp_path / "x.gguf", extra=extra)
    _refused(tmp_path, src, "'blk.0.attn_sinks.weight' has no Hugging Face Llama name")


def test_shapes_that_disagree_with_metadata(tmp_path):
    src = write_gguf(tmp_path / "x.gguf", n_heads_meta=8)  # tensors are sized for 4 heads
    _refused(tmp_path, src, r"blk.0.attn_q.weight' has shape \(64, 64\), expected \(128, 64\)")


def test_unsupported_pre_tokenizer(tmp_path):
    src = write_gguf(tmp_path / "x.gguf", pre="falcon")
    _refused(tmp_path, src, r"pre-type 'falcon' is not supported.*smollm")


def test_bad_dtype(tmp_path):
    _refused(tmp_path, tmp_path / "whatever.gguf", "dtype 'int8' is not supported", dtype="int8")


def test_existing_output_needs_force(tmp_path):
    src = write_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="--force"):
        import_gguf(gguf_path=src, out_dir=out)
    assert (out / "precious.txt").read_text() == "keep me"
    import_gguf(gguf_path=src, out_dir=out, force=True)
    assert not (out / "precious.txt").exists() and (out / "config.json").is_file()


# --- the real SmolLM2-135M-Instruct ------------------------------------------------------------

def test_smollm2_config(smollm2):
    _, out = smollm2
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                "num_key_value_heads", "intermediate_size", "vocab_size",
                                "tie_word_embeddings", "head_dim", "torch_dtype")} == {
        "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9,
        "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
        "tie_word_embeddings": True, "head_dim": 64, "torch_dtype": "float16"}
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["max_position_embeddings"]) == (
        100000.0, 1e-5, 8192)
    tensors = read_checkpoint(out)
    assert len(tensors) == 2 + 9 * 30 and "lm_head.weight" not in tensors
    assert all(t.dtype == torch.float16 for t in tensors.values())
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tc["chat_template"]


def test_smollm2_loads_in_transformers_and_answers(smollm2):
    from transformers import AutoTokenizer

    _, out = smollm2
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids.tolist() == [[504, 3575, 282, 4649, 314]]  # llama.cpp's ids for this text
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        next_id = int(model(ids).logits[0, -1].argmax())
    assert tok.decode([next_id]) == " Paris"


@needs_llama_cpp
def test_smollm2_tokenizer_matches_llama_cpp(smollm2):
    path, out = smollm2
    texts = [WIKITEXT.read_text(encoding="utf-8"), *ODD, *CHAT_ODD, "<repo_name>x<file_sep>y"]
    ref = _llama_cpp_ids(path, texts)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    for (text, special), want in ref.items():
        tok.encode_special_tokens = not special
        assert tok.encode(text).ids == want, (text[:80], special)
    assert len(ref[texts[0], False]) > 200_000  # the whole file, not an empty string
