"""``python -m lowmem_bonsai``: the command line (torchrun ``-m lowmem_bonsai`` starts it per rank)."""

from __future__ import annotations

from .cli import app

app(prog_name="lowmem-bonsai")
