"""Model families. Each family is one adapter: its tensor names (from the tensor table), its GGUF
graph and its few quirks.

Generic code asks ``adapter_for(config)`` and never looks at ``model_type`` itself.
"""

from __future__ import annotations

from typing import Any, Protocol

from ...errors import UserError
from .llama import LlamaAdapter, MistralAdapter, Qwen2Adapter

SUPPORTED_ROPE = ("default", "linear", "llama3")


class Adapter(Protocol):
    """What the executor needs from a model family."""

    architecture: str
    names: dict[str, str]  # executor key -> HF name template (see ..tensors)
    gguf_arch: str  # llama.cpp's graph for the family when every layer has the same widths
    gguf_neox_rope: bool  # that graph rotates halves like HF (q/k rows keep their order)

    def attention_bias(self, raw: dict[str, Any]) -> bool:
        """Whether q/k/v projections carry biases."""
        ...

    def sliding_window(self, raw: dict[str, Any]) -> int | None:
        """Attention window in tokens, or None for full causal attention."""
        ...


ADAPTERS: dict[str, Adapter] = {
    a.architecture: a for a in (LlamaAdapter(), MistralAdapter(), Qwen2Adapter())
}


def adapter_for(architecture: str, *, source: str) -> Adapter:
    try:
        return ADAPTERS[architecture]
    except KeyError:
        raise UserError(
            f"{source}: architecture '{architecture}' is not supported; supported: "
            f"{', '.join(sorted(ADAPTERS))}"
        ) from None


def check_rope(rope_scaling: dict[str, Any] | None, *, source: str) -> None:
    kind = (rope_scaling or {}).get("rope_type", "default")
    if kind not in SUPPORTED_ROPE:
        raise UserError(
            f"{source}: rope scaling '{kind}' is not supported; supported: {', '.join(SUPPORTED_ROPE)}"
        )
