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
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

from lowmem_bonsai.llamacpp import from_gguf
from lowmem_bonsai.errors import UserError
from lowmem_bonsai.llamacpp.from_gguf import import_gguf
from lowmem_bonsai.llamacpp.vocab_from_gguf import tokenizer_from_gguf

from .conftest import (CHAT_ODD, CORPUS, ODD, WIKITEXT, byte_level_vocab, read_checkpoint, refused_import,
                       tiny_model, write_gguf)

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed")

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
    monkeypatch.setattr(from_gguf, "_ROWS_PER_CHUNK", 7)  # several chunks, one ragged
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

def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 a zip, not a model")
    refused_import(tmp_path, tmp_path / "x.gguf", "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    refused_import(tmp_path, tmp_path / "empty.gguf", "not a GGUF file")
    refused_import(tmp_path, tmp_path / "missing.gguf", "no such file")


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_gguf(tmp_path, keep):
    data = write_gguf(tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * keep)])
    refused_import(tmp_path, tmp_path / "cut.gguf", "truncated or corrupt")


def test_unsupported_arch(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused_import(tmp_path, tmp_path / "gpt2.gguf", r"architecture 'gpt2' is not supported.*llama")


def test_unmapped_tensor_is_named(tmp_path):
    extra = {"blk.0.attn_sinks.weight": np.zeros(4, np.float32)}
    src = write_gguf(tmp_path / "x.gguf", extra=extra)
    refused_import(tmp_path, src, "'blk.0.attn_sinks.weight' has no Hugging Face Llama name")


def test_shapes_that_disagree_with_metadata(tmp_path):
    src = write_gguf(tmp_path / "x.gguf", n_heads_meta=8)  # tensors are sized for 4 heads
    refused_import(tmp_path, src, r"blk.0.attn_q.weight' has shape \(64, 64\), expected \(128, 64\)")


def test_unsupported_pre_tokenizer(tmp_path):
    src = write_gguf(tmp_path / "x.gguf", pre="falcon")
    refused_import(tmp_path, src, r"pre-type 'falcon' is not supported.*smollm")


def test_bad_dtype(tmp_path):
    refused_import(tmp_path, tmp_path / "whatever.gguf", "dtype 'int8' is not supported", dtype="int8")


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
