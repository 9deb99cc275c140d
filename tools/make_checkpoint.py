"""Write a random-weight checkpoint in the exact shapes of a real model, shard by shard.

For memory, I/O and speed work only (quality needs a real model). Weights are drawn from a seeded
normal with std 0.02 (norms at 1), in bf16 by default; one tensor is held in memory at a time.

    python tools/make_checkpoint.py llama2-13b runs/llama2-13b-random
    python tools/make_checkpoint.py tinyllama-1.1b /tmp/tl --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowmem_bonsai.outputs.atomic import staged_dir  # noqa: E402
from lowmem_bonsai.outputs.shards import PlannedTensor, ShardWriter  # noqa: E402
from lowmem_bonsai.texts import bundled_path  # noqa: E402

SHAPES = {
    # name: hidden, layers, heads, kv heads, ffn, vocab, tied
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 32000, False),
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000, False),
    "llama2-13b": (5120, 40, 40, 40, 13824, 32000, False),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256, False),
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152, True),
}
WIKITEXT = bundled_path("wikitext2-valid")  # shipped in the package (lowmem_bonsai/_texts)


def config_for(name: str, *, layers: int | None = None) -> dict:
    """The real model's config; ``layers`` keeps its widths with fewer (or more) blocks."""
    hidden, depth, heads, kv, ffn, vocab, tied = SHAPES[name]
    layers = layers or depth
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": hidden // heads, "intermediate_size": ffn, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": tied, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }


def word_tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer over WikiText-2 words, so `eval` and `prune` have text to run on."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    text = WIKITEXT.read_text(encoding="utf-8")
    words = [w for w, _ in Counter(text.split()).most_common(min(vocab, 30000) - 1)]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))


def bpe_tokenizer(path: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer (GPT-2 style) trained on WikiText-2, at most ``vocab`` tokens: one
    that ``export-gguf`` can convert (it pads the vocabulary to the embedding's rows)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 8000), special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(WIKITEXT)], trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def write(name: str, out: Path, *, dtype: torch.dtype, seed: int, shard_gb: float, force: bool,
          tokenizer_from: Path | None = None, layers: int | None = None, bpe: bool = False) -> None:
    cfg = config_for(name, layers=layers)
    if tokenizer_from is not None:  # a real tokenizer (e.g. for GGUF export); the vocab follows it
        from tokenizers import Tokenizer

        cfg["vocab_size"] = Tokenizer.from_file(str(tokenizer_from / "tokenizer.json")).get_vocab_size()
    h, n_layers, ffn, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    tensors = [("model.embed_tokens.weight", (vocab, h))]  # (name, shape) in writing order
    for i in range(n_layers):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                    (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                    (p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,)),
                    (p + "mlp.gate_proj.weight", (ffn, h)), (p + "mlp.up_proj.weight", (ffn, h)),
                    (p + "mlp.down_proj.weight", (h, ffn))]
    tensors.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        tensors.append(("lm_head.weight", (vocab, h)))

    with staged_dir(out, force=force) as stage:
        w = ShardWriter(stage, [PlannedTensor(name=n, dtype=dtype, shape=s) for n, s in tensors],
                        max_shard_bytes=int(shard_gb * 1024**3))
        for name, shape in tensors:  # norms at 1, matrices random; one tensor held at a time
            w.add(name, torch.ones(shape, dtype=dtype) if len(shape) == 1 else rand(*shape))
            if name.endswith("down_proj.weight"):
                print(f"\rlayer {name.split('.')[2]}/{n_layers}", end="", file=sys.stderr, flush=True)
        w.close()
        (stage / "config.json").write_text(json.dumps(cfg, indent=2))
        if bpe:
            bpe_tokenizer(stage, vocab)
        elif tokenizer_from is None:
            word_tokenizer(stage, vocab)
        else:
            for f in ("tokenizer.json", "tokenizer_config.json"):
                if (tokenizer_from / f).is_file():
                    (stage / f).write_bytes((tokenizer_from / f).read_bytes())
    print(f"\nwrote {out}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--bpe", action="store_true", help="a byte-level BPE tokenizer trained on "
                    "WikiText-2 (export-gguf converts it) instead of a word-level one")
    ap.add_argument("--layers", type=int, help="number of blocks (default: the real model's); the "
                    "widths, heads and vocabulary stay exact")
    ap.add_argument("--tokenizer-from", type=Path, help="copy tokenizer files from this checkpoint "
                    "(vocab_size follows it) instead of writing a word-level one")
    a = ap.parse_args()
    write(a.shape, a.out, dtype=getattr(torch, a.dtype), seed=a.seed, shard_gb=a.shard_gb, force=a.force,
          tokenizer_from=a.tokenizer_from, layers=a.layers, bpe=a.bpe)


if __name__ == "__main__":
    main()
