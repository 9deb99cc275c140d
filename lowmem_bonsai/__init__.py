"""lowmem-bonsai: structured pruning of LLMs with forward passes only, streamed block by block."""

from __future__ import annotations

__version__ = "0.1.0"
