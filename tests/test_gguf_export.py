"""HF checkpoint -> GGUF export, checked by llama.cpp itself.

Tiny random models of every family are exported dense and pruned to different widths per layer;
llama.cpp's logits must equal transformers' (pruned units zeroed) and its NLL our streamed
forward's. The real SmolLM2-135M, pruned unevenly, must give llama.cpp the same perplexity as our
evaluator, and llama.cpp must tokenize text exactly like the checkpoint's tokenizer.json.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from typer.testing import CliRunner

from lowmem_bonsai.llamacpp import to_gguf
from lowmem_bonsai.model.checkpoint import Checkpoint
from lowmem_bonsai.cli import app
from lowmem_bonsai.errors import UserError
from lowmem_bonsai.evaluate import evaluate
from lowmem_bonsai.engine.forward import streamed_nll
from lowmem_bonsai.llamacpp.to_gguf import export_gguf
from lowmem_bonsai.llamacpp.from_gguf import import_gguf
from lowmem_bonsai.llamacpp.vocab_to_gguf import PROBE_TEXT, vocab_from_checkpoint
from lowmem_bonsai.llamacpp.runner import generate, gguf_perplexity
from lowmem_bonsai.outputs.atomic import write_json_atomic
from lowmem_bonsai.model.plan import LayerPlan, Plan
from lowmem_bonsai.outputs.writer import copy_tokenizer, pruned_config, write_pruned

from .conftest import (CHAT_ODD, CORPUS, ODD, WIKITEXT, byte_level_vocab, load_tool, make_tiny, sample_words,
                       write_gguf, zero_removed)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python not installed")

# Per layer: kept KV groups (their query heads follow) and kept MLP channels (of 96).
UNEVEN = [((0,), tuple(range(0, 96, 3))), ((0, 1), tuple(range(64))), ((1,), tuple(range(32, 64)))]
# Modules that vanish entirely: layer 0 without heads, the last two without MLP channels.
VANISHED = [((), tuple(range(0, 96, 3))), ((0, 1), ()), ((1,), ())]


# --- helpers -----------------------------------------------------------------------------------

def tiny(path: Path, family: str, **overrides):
    """A tiny random model of ``family`` with a byte-level BPE tokenizer.json written by HF."""
    tok, tokens, _, _ = byte_level_vocab()
    model = make_tiny(path, family, vocab_size=len(tokens), **overrides)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"}))
    return model


def plan_of(keep, *, n_heads: int, n_kv: int) -> Plan:
    group = n_heads // n_kv
    layers = []
    for kv, channels in keep:
        kv = tuple(k for k in kv if k < n_kv)
        layers.append(LayerPlan(tuple(h for h in range(n_heads) if h // group in kv), kv, channels))
    return Plan(tuple(layers))


def prune_by_plan(src: Path, dst: Path, plan: Plan, *, repair_on: torch.Tensor | None = None) -> Path:
    """A pruned checkpoint folder, as `lowmem-bonsai prune` writes it, from a hand-made plan
    (repaired by bias reconstruction on the token windows ``repair_on``, if given: FLAP's
    compensation adds o_proj / down_proj biases without refitting weights, so a few random windows
    cannot overfit it)."""
    from lowmem_bonsai.method.reconstruct import reconstruct

    ckpt = Checkpoint(src)
    if repair_on is not None:
        ckpt = ckpt.with_overlay(reconstruct(ckpt, plan, repair_on, dst.with_name(dst.name + "-repair"),
                                             mode="bias").files)
    dst.mkdir(parents=True)
    write_pruned(ckpt, plan, dst)
    write_json_atomic(dst / "config.json", pruned_config(ckpt, plan))
    write_json_atomic(dst / "plan.json", plan.to_json())
    copy_tokenizer(src, dst)
    return dst


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position (F32 KV cache, so only the matmuls differ).  (T, V)"""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True,
                          type_k=int(gguf.GGMLQuantizationType.F32),
                          type_v=int(gguf.GGMLQuantizationType.F32), n_threads=1, n_threads_batch=1,
                          verbose=False)
    llm.eval(ids)
    out = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
    llm.close()
    return out


def nll_sum(logits: np.ndarray, ids: list[int]) -> float:
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return float((lse[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]).sum())


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()} | {
        "tensors": {t.name: (tuple(int(n) for n in reversed(t.shape.tolist())), t.tensor_type.name)
                    for t in reader.tensors}}


def assert_no_partials(folder: Path) -> None:
    assert not list(folder.glob(".*partial*")), list(folder.iterdir())


IDS = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(1)).tolist()


# --- tiny models: dense and uneven, every family -----------------------------------------------

def test_dense_export_matches_transformers(tmp_path, family):
    model = tiny(tmp_path / "m", family)
    out = export_gguf(model_dir=tmp_path / "m", out=tmp_path / "m.gguf", type="f32")
    f = fields(out)
    arch = "qwen2" if family.startswith("qwen2") else "llama"
    assert f["general.architecture"] == arch
    assert (f[f"{arch}.attention.head_count"], f[f"{arch}.feed_forward_length"]) == (4, 96)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    tied = model.config.tie_word_embeddings
    assert ("output.weight" in f["tensors"]) is not tied
    assert ("rope_freqs.weight" in f["tensors"]) is (family == "llama3-rope")
    assert f["tensors"]["blk.0.attn_k.weight"] == ((model.config.num_key_value_heads * 16, 64), "F32")
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].double().numpy()  # (T, V)
    got = llama_logits(out, IDS)
    assert np.abs(got - ref).max() < 1e-5, np.abs(got - ref).max()


def test_linear_rope_scaling(tmp_path):
    model = tiny(tmp_path / "m", "llama-gqa-tied", rope_scaling={"rope_type": "linear", "factor": 4.0})
    out = export_gguf(model_dir=tmp_path / "m", out=tmp_path / "m.gguf", type="f32")
    f = fields(out)
    assert (f["llama.rope.scaling.type"], f["llama.rope.scaling.factor"]) == ("linear", 4.0)
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].double().numpy()
    assert np.abs(llama_logits(out, IDS) - ref).max() < 1e-5


def test_uneven_widths_export_as_deci(tmp_path, family):
    model = tiny(tmp_path / "m", family)
    cfg = model.config
    plan = plan_of(UNEVEN, n_heads=4, n_kv=cfg.num_key_value_heads)
    pruned = prune_by_plan(tmp_path / "m", tmp_path / "p", plan)
    out = export_gguf(model_dir=pruned, out=tmp_path / "p.gguf", type="f32")
    f = fields(out)
    assert f["general.architecture"] == "deci"
    assert f["deci.attention.head_count"] == [len(lp.heads) for lp in plan.layers]
    assert f["deci.attention.head_count_kv"] == [len(lp.kv_heads) for lp in plan.layers]
    assert f["deci.feed_forward_length"] == [32, 64, 32]
    assert (f["deci.attention.key_length"], f["deci.rope.dimension_count"]) == (16, 16)
    assert f["tensors"]["blk.2.ffn_down.weight"][0] == (64, 32)
    if family == "qwen2-bias":  # Qwen2's q/k/v biases load in deci at the layer's own width
        assert f["tensors"]["blk.0.attn_q.bias"][0] == (len(plan.layers[0].heads) * 16,)

    zero_removed(model, plan, head_dim=16)
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].double().numpy()
    got = llama_logits(out, IDS)
    assert np.abs(got - ref).max() < 1e-5, np.abs(got - ref).max()
    ours = float(streamed_nll(Checkpoint(pruned), torch.tensor([IDS]))[0, 0])
    assert abs(nll_sum(got, IDS) - ours) < 1e-4 * abs(ours)


@pytest.mark.parametrize("keep", [[((0, 1), tuple(range(0, 96, 2)))] * 3, UNEVEN], ids=["llama", "deci"])
def test_every_projection_bias_reaches_llama_cpp(tmp_path, keep):
    """HF Llama's attention_bias + mlp_bias (q, k, v, o, gate, up, down biases), pruned uniformly
    (arch llama) and unevenly (deci): llama.cpp's logits equal transformers'."""
    model = tiny(tmp_path / "m", "llama-gqa-tied", attention_bias=True, mlp_bias=True)
    plan = plan_of(keep, n_heads=4, n_kv=2)
    pruned = prune_by_plan(tmp_path / "m", tmp_path / "p", plan)
    out = export_gguf(model_dir=pruned, out=tmp_path / "p.gguf", type="f32")
    assert {"blk.1.ffn_gate.bias", "blk.1.ffn_up.bias", "blk.1.attn_output.bias"} <= set(fields(out)["tensors"])
    zero_removed(model, plan, head_dim=16)
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].double().numpy()
    got = llama_logits(out, IDS)
    assert np.abs(got - ref).max() < 1e-5, np.abs(got - ref).max()


@pytest.mark.parametrize("family", ["llama-gqa-tied", "qwen2-bias"])
def test_vanished_modules_become_exact_zero_padding(tmp_path, family):
    model = tiny(tmp_path / "m", family)
    plan = plan_of(VANISHED, n_heads=4, n_kv=2)
    out = export_gguf(model_dir=prune_by_plan(tmp_path / "m", tmp_path / "p", plan),
                      out=tmp_path / "p.gguf", type="f32")
    f = fields(out)
    assert f["deci.attention.head_count"] == [1, 4, 2]  # one zero head stands in for none
    assert f["deci.feed_forward_length"] == [32, 32, 32]  # 32 zero channels stand in for none
    zero_removed(model, plan, head_dim=16)
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0].double().numpy()
    assert np.abs(llama_logits(out, IDS) - ref).max() < 1e-5


def test_quantized_types(tmp_path):
    # Widths multiple of 256 everywhere, so K-quants apply to every matrix.
    tiny(tmp_path / "m", "llama-gqa-tied", hidden_size=256, intermediate_size=512, head_dim=64,
         layers=2)
    ref = llama_logits(export_gguf(model_dir=tmp_path / "m", out=tmp_path / "f32.gguf",
                                   type="f32"), IDS)
    for qtype, matrix, bound in (("bf16", "BF16", 0.02), ("q8_0", "Q8_0", 0.05),
                                 ("q4_0", "Q4_0", 0.5), ("q4_k_m", "Q4_K", 0.5)):
        out = export_gguf(model_dir=tmp_path / "m", out=tmp_path / f"{qtype}.gguf", type=qtype)
        types = {name: t for name, (_, t) in fields(out)["tensors"].items()}
        assert types["blk.0.attn_q.weight"] == matrix, qtype
        assert types["token_embd.weight"] in (matrix, "Q8_0") and types["blk.0.attn_norm.weight"] == "F32"
        diff = np.abs(llama_logits(out, IDS) - ref).max()
        assert 0 < diff < bound * np.abs(ref).max(), (qtype, diff)
    assert_no_partials(tmp_path)
    text = generate(gguf=tmp_path / "q4_k_m.gguf", prompt="The quick brown", n_tokens=5)
    assert isinstance(text, str)


# --- refusals ----------------------------------------------------------------------------------

def _refused(out: Path, match: str, **kwargs) -> None:
    with pytest.raises(UserError, match=match) as info:
        export_gguf(out=out, **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert_no_partials(out.parent)


def test_misaligned_widths_are_refused_for_quantized_types(tmp_path, caplog):
    tiny(tmp_path / "m", "llama-gqa-tied", intermediate_size=40)
    out = tmp_path / "x.gguf"
    _refused(out, r"q4_k_m needs widths divisible by 32: layer 0 FFN width 40.*keep those matrices "
             r"in F16.*alignment of 32", model_dir=tmp_path / "m", type="q4_k_m")
    _refused(out, r"q8_0 needs widths divisible by 32: layer 0 FFN width 40.*F16",
             model_dir=tmp_path / "m", type="q8_0")
    _refused(out, r"--type 'q3' is not supported", model_dir=tmp_path / "m", type="q3")


def test_k_quant_of_widths_not_divisible_by_256_falls_back_like_llama_cpp(tmp_path, caplog):
    tiny(tmp_path / "n", "llama-gqa-tied")  # every width a multiple of 32, none of 256
    out = export_gguf(model_dir=tmp_path / "n", out=tmp_path / "q6.gguf", type="q6_k")
    assert "llama.cpp stores those matrices in 32-block types" in caplog.text
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # q6_K's fallback for 96-wide rows


def test_gqa_violations_are_refused(tmp_path):
    tiny(tmp_path / "m", "llama-gqa-tied")
    pruned = prune_by_plan(tmp_path / "m", tmp_path / "p", plan_of(UNEVEN, n_heads=4, n_kv=2))
    cfg = json.loads((pruned / "config.json").read_text())
    for heads, kv, words in (([2, 3, 2], [1, 2, 1], "layer 1 has 3 query heads for 2 KV heads"),
                             ([2, 4, 2], [1, 0, 1], "layer 1 has 4 query heads for 0 KV heads")):
        cfg |= {"num_attention_heads_per_layer": heads, "num_key_value_heads_per_layer": kv}
        (pruned / "config.json").write_text(json.dumps(cfg))
        _refused(tmp_path / "x.gguf", words, model_dir=pruned)


def test_existing_output_needs_force_and_failures_leave_nothing(tmp_path, monkeypatch):
    tiny(tmp_path / "m", "llama-gqa-tied")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(UserError, match="exists; pass --force"):
        export_gguf(model_dir=tmp_path / "m", out=out)
    assert out.read_bytes() == b"precious"

    calls = []

    def broken(ckpt, job):  # the disk "fills up" after a few tensors
        calls.append(job.name)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        return real(ckpt, job)

    real = to_gguf.tensor_data
    monkeypatch.setattr(to_gguf, "tensor_data", broken)
    with pytest.raises(UserError, match="disk is full.*free disk space"):
        export_gguf(model_dir=tmp_path / "m", out=out, force=True)
    assert out.read_bytes() == b"precious"
    assert_no_partials(tmp_path)
    monkeypatch.setattr(to_gguf, "tensor_data", real)
    export_gguf(model_dir=tmp_path / "m", out=out, force=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_unmapped_tensor_is_named(tmp_path):
    tiny(tmp_path / "m", "llama-gqa-tied")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    tensors["model.layers.0.mlp.gate_proj.lora_A"] = torch.zeros(96)
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    _refused(tmp_path / "x.gguf", "'model.layers.0.mlp.gate_proj.lora_A'.*no place",
             model_dir=tmp_path / "m")


# --- tokenizers --------------------------------------------------------------------------------

_HF_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
HF_SPLITS = {  # pre_tokenizer JSON as transformers writes it for these families
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _HF_TAIL,
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _HF_TAIL,
}


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_pre_tokenizer_is_identified_and_llama_cpp_agrees(tmp_path, pre):
    if pre == "gpt-2":
        pretok = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        pretok = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(HF_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = pretok
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([CORPUS, PROBE_TEXT * 3, "1999 2024 12345 007 31415926"], trainer=trainer)
    model_dir = tmp_path / "m"
    make_tiny(model_dir, "llama-gqa-tied", vocab_size=tok.get_vocab_size(), layers=1)
    tok.save(str(model_dir / "tokenizer.json"))
    vocab = vocab_from_checkpoint(model_dir, vocab_size=tok.get_vocab_size())
    assert vocab.pre == pre
    out = export_gguf(model_dir=model_dir, out=tmp_path / "t.gguf", type="f32")
    check_llama_cpp_tokenizes_like(out, tok, [CORPUS, PROBE_TEXT, *ODD])


def test_sentencepiece_vocab_round_trips_through_hf(tmp_path, caplog):
    """GGUF (llama/SPM) -> import -> export: llama.cpp gives the same ids from both files."""
    import llama_cpp

    src = write_gguf(tmp_path / "src.gguf", tokenizer="llama")
    hf = import_gguf(gguf_path=src, out_dir=tmp_path / "hf", dtype="float32")
    out = export_gguf(model_dir=hf, out=tmp_path / "out.gguf", type="f32")
    f = fields(out)
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.add_bos_token"],
            f["tokenizer.ggml.add_space_prefix"]) == ("llama", True, True)
    assert f["tokenizer.ggml.token_type"] == fields(src)["tokenizer.ggml.token_type"]
    a = llama_cpp.Llama(model_path=str(src), vocab_only=True, verbose=False)
    b = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in [CORPUS, *ODD, "<s>hello</s> world"]:
        for special in (False, True):
            assert (a.tokenize(text.encode(), add_bos=True, special=special)
                    == b.tokenize(text.encode(), add_bos=True, special=special)), text[:60]

    # transformers' newer Llama files: a Metaspace pre-tokenizer, which prepends no "▁" to text
    # that starts with a space; llama.cpp cannot do that, so the export warns about it.
    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.save(str(hf / "tokenizer.json"))
    with caplog.at_level("WARNING"):
        out = export_gguf(model_dir=hf, out=tmp_path / "out.gguf", type="f32", force=True)
    assert "' leading space'" in caplog.text
    check_llama_cpp_tokenizes_like(out, tok, [CORPUS, "no leading space"])


def check_llama_cpp_tokenizes_like(path: Path, tok: Tokenizer, texts: list[str]) -> None:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in texts:
        want = tok.encode(text, add_special_tokens=False).ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text[:60]


# --- the real SmolLM2-135M ---------------------------------------------------------------------

def smollm2_plan(model_dir: Path) -> Plan:
    """Uneven on purpose: some layers lose one or two of their 3 KV groups (3 query heads each),
    every layer loses 0-96 of its 1536 channels, so every width differs from its neighbours'."""
    kv_by_layer = {3: (0, 2), 9: (1, 2), 16: (0, 1), 22: (2,)}
    layers = []
    for i in range(Checkpoint(model_dir).config.num_hidden_layers):
        kv = kv_by_layer.get(i, (0, 1, 2))
        dropped = 32 * (i % 4)
        layers.append(LayerPlan(tuple(h for h in range(9) if h // 3 in kv), kv,
                                tuple(range(dropped, 1536))))
    return Plan(tuple(layers))


@pytest.fixture(scope="module")
def smollm2_texts() -> Path:
    return WIKITEXT


@pytest.fixture(scope="module")
def smollm2_f16(smollm2, tmp_path_factory) -> Path:
    """The imported SmolLM2 checkpoint re-exported as F16, once for this module."""
    return export_gguf(model_dir=smollm2[1], out=tmp_path_factory.mktemp("gguf") / "smol.gguf")


def test_smollm2_dense_and_pruned_perplexity_match_ours(smollm2, smollm2_f16, smollm2_texts,
                                                        tmp_path):
    _, hf = smollm2
    pruned = prune_by_plan(hf, tmp_path / "pruned", smollm2_plan(hf))
    pruned_gguf = export_gguf(model_dir=pruned, out=tmp_path / "pruned.gguf")
    calib = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    repaired = prune_by_plan(hf, tmp_path / "repaired", smollm2_plan(hf), repair_on=calib)
    repaired_gguf = export_gguf(model_dir=repaired, out=tmp_path / "repaired.gguf")
    assert "blk.16.attn_output.bias" in fields(repaired_gguf)["tensors"]
    for model_dir, path, arch in ((hf, smollm2_f16, "llama"), (pruned, pruned_gguf, "deci"),
                                  (repaired, repaired_gguf, "deci")):
        assert fields(path)["general.architecture"] == arch
        # threads=1: llama.cpp's spinning threads crawl when the 2 cores here are shared
        ref = gguf_perplexity(gguf=path, data=smollm2_texts, seq_len=128, max_seqs=6, threads=1)
        ours = evaluate(model_dir=model_dir, data=smollm2_texts, seq_len=128, max_seqs=6)
        assert ref.tokens == ours.tokens == 6 * 127
        assert 5 < ours.perplexity < 100
        assert abs(ref.perplexity / ours.perplexity - 1) < 0.01, (arch, ref.perplexity, ours.perplexity)
        # window by window too (F16 against float32: within 0.01 nats per window)
        assert len(ref.window_nll) == len(ours.window_nll) == 6
        assert max(abs(a - b) for a, b in zip(ref.window_nll, ours.window_nll)) < 0.01


def test_smollm2_tokenizer_and_chat_survive_export(smollm2, smollm2_f16, smollm2_texts):
    _, hf = smollm2
    f = fields(smollm2_f16)
    assert (f["tokenizer.ggml.pre"], f["tokenizer.ggml.bos_token_id"],
            f["tokenizer.ggml.eos_token_id"]) == ("smollm", 1, 2)
    assert "<|im_start|>" in f["tokenizer.chat_template"]
    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    check_llama_cpp_tokenizes_like(smollm2_f16, tok, [
        smollm2_texts.read_text(encoding="utf-8")[:200_000], *ODD, *CHAT_ODD])
    answer = generate(gguf=smollm2_f16, prompt="What is the capital of France?", n_tokens=12,
                      chat=True, threads=1)
    assert "Paris" in answer


# --- the command line --------------------------------------------------------------------------

def test_cli_export_generate_and_eval(tmp_path, sample_text):
    tiny(tmp_path / "m", "qwen2-bias")
    runner = CliRunner()
    out = tmp_path / "m.gguf"
    res = runner.invoke(app, ["export-gguf", str(tmp_path / "m"), "--out", str(out), "--type", "q8_0"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export-gguf", str(tmp_path / "m"), "--out", str(out)])
    assert res.exit_code == 2 and "--force" in res.output
    res = runner.invoke(app, ["generate", str(out), "--prompt", "The fox", "-n", "4"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["generate", str(out), "--prompt", "Hi", "-n", "4", "--chat"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", str(out), "--data", str(sample_text), "--seq-len", "32",
                              "--max-seqs", "3"])
    assert res.exit_code == 0, res.output
    ppl = float(res.output.split("perplexity ")[1].split()[0])
    assert math.isfinite(ppl) and ppl > 1 and "93 tokens" in res.output
    (tmp_path / "bad.gguf").write_bytes(b"nope")
    res = runner.invoke(app, ["generate", str(tmp_path / "bad.gguf"), "--prompt", "x"])
    assert res.exit_code == 2 and "not a GGUF file" in res.output


@pytest.mark.parametrize("plan_kind", ["uniform", "uneven"])
def test_reconstruction_biases_travel_to_llama_cpp(tmp_path, plan_kind):
    """A repaired model (o_proj / down_proj biases) gives llama.cpp our streamed eval's NLL."""
    from lowmem_bonsai.method.reconstruct import reconstruct

    tiny(tmp_path / "m", "llama-gqa-tied")
    ckpt = Checkpoint(tmp_path / "m")
    keep = UNEVEN if plan_kind == "uneven" else [((1,), tuple(range(0, 96, 2)))] * 3
    plan = plan_of(keep, n_heads=4, n_kv=2)
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(5))
    rep = reconstruct(ckpt, plan, calib, tmp_path / "repair", mode="lsq")
    fixed = ckpt.with_overlay(rep.files)
    pruned = tmp_path / "p"
    pruned.mkdir()
    write_pruned(fixed, plan, pruned)
    write_json_atomic(pruned / "config.json", pruned_config(fixed, plan))
    copy_tokenizer(tmp_path / "m", pruned)
    out = export_gguf(model_dir=pruned, out=tmp_path / "p.gguf", type="f32")
    f = fields(out)
    assert f["general.architecture"] == ("llama" if plan_kind == "uniform" else "deci")
    assert f["tensors"]["blk.0.attn_output.bias"] == ((64,), "F32")
    assert f["tensors"]["blk.2.ffn_down.bias"] == ((64,), "F32")
    got = nll_sum(llama_logits(out, IDS), IDS)
    ours = float(streamed_nll(Checkpoint(pruned), torch.tensor([IDS]))[0, 0])
    plain = float(streamed_nll(ckpt, torch.tensor([IDS]), plan=plan)[0, 0])
    assert abs(got - ours) < 1e-4 * abs(ours), (got, ours)
    assert abs(ours - plain) > 1e-3 * abs(plain)  # the biases and refit weights were used
    if plan_kind == "uneven":  # tools/check_gguf_ppl.py: the same check as perplexity, in its JSON
        text = tmp_path / "t.txt"
        text.write_text(sample_words(), encoding="utf-8")
        load_tool("check_gguf_ppl").main(["--models", f"p={pruned}", "--out", str(tmp_path / "c.json"),
                                          "--data", str(text), "--type", "f32", "--seq-len", "32",
                                          "--max-seqs", "4", "--skip", "0"])
        (row,) = json.loads((tmp_path / "c.json").read_text())["rows"]
        written = Checkpoint(pruned)
        biases = [sum(written.has(written.name(key, i).removesuffix("weight") + "bias") for i in range(3))
                  for key in ("o", "down")]  # layers that lost heads / channels: 2 and 3 here
        assert (row["architecture"], [row["attn_output_biases"], row["ffn_down_biases"]]) == ("deci", biases)
        assert biases == [2, 3]
        assert row["tokens"] == 4 * 31 and row["model"] == "p"
        assert abs(row["relative_difference"]) < 1e-4 and row["llama_cpp"] > 1, row
        assert row["max_window_nll_difference"] < 1e-4, row
