"""Llama, Mistral and Qwen2: the same tensor names, different bias and window rules."""

from __future__ import annotations

from typing import Any

# HF tensor names; "{}" is the layer index. Keys are the executor's names for the weights.
LLAMA_NAMES: dict[str, str] = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{}.input_layernorm.weight",
    "q": "model.layers.{}.self_attn.q_proj.weight",
    "k": "model.layers.{}.self_attn.k_proj.weight",
    "v": "model.layers.{}.self_attn.v_proj.weight",
    "q_bias": "model.layers.{}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{}.self_attn.v_proj.bias",
    "o": "model.layers.{}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{}.post_attention_layernorm.weight",
    "gate": "model.layers.{}.mlp.gate_proj.weight",
    "up": "model.layers.{}.mlp.up_proj.weight",
    "down": "model.layers.{}.mlp.down_proj.weight",
}


class LlamaAdapter:
    architecture = "LlamaForCausalLM"
    names = LLAMA_NAMES

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

    def attention_bias(self, raw: dict[str, Any]) -> bool:
        return True  # Qwen2 always has q/k/v biases (and none on o_proj)

    def sliding_window(self, raw: dict[str, Any]) -> int | None:
        if not raw.get("use_sliding_window", False):
            return None
        window = raw.get("sliding_window")
        return int(window) if window else None
