"""Llama, Mistral and Qwen2: the same tensor names, different bias and window rules."""

from __future__ import annotations

from typing import Any

from ..tensors import USED

# HF tensor names from the tensor table; "{}" is the layer index. Keys are the executor's names.
LLAMA_NAMES: dict[str, str] = {s.key: s.hf for s in USED}


class LlamaAdapter:
    architecture = "LlamaForCausalLM"
    names = LLAMA_NAMES
    gguf_arch = "llama"  # llama.cpp's graph for a model whose layers all have the same widths
    gguf_neox_rope = False  # llama.cpp's llama graph rotates adjacent pairs: q/k rows are reordered

    def attention_bias(self, raw: dict[str, Any]) -> bool:
        return bool(raw.get("attention_bias", False))

    def sliding_window(self, raw: dict[str, Any]) -> int | None:
        return None


class MistralAdapter(LlamaAdapter):
    architecture = "MistralForCausalLM"

    def attention_bias(self, raw: dict[str, Any]) -> bool:
        return False

    def sliding_window(self, raw: dict[str, Any]) -> int | None:
        window = raw.get("sliding_window")
        return int(window) if window else None


class Qwen2Adapter(LlamaAdapter):
    architecture = "Qwen2ForCausalLM"
    gguf_arch = "qwen2"
    gguf_neox_rope = True  # the qwen2 graph rotates halves like HF: q/k rows keep their order

    def attention_bias(self, raw: dict[str, Any]) -> bool:
        return True  # Qwen2 always has q/k/v biases (and none on o_proj)

    def sliding_window(self, raw: dict[str, Any]) -> int | None:
        if not raw.get("use_sliding_window", False):
            return None
        window = raw.get("sliding_window")
        return int(window) if window else None
