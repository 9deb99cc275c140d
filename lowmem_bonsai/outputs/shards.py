"""Safetensors shard writer: tensors in, sharded checkpoint + index out, a bounded amount held.

Tensors are buffered until a shard is full, then written under a temporary name and fsynced; at
``close`` the shards are renamed to the Hugging Face names (``model.safetensors`` for one shard,
``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json`` for more).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import WriteError
from .atomic import fsync_dir, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2 * 1024**3


def _os_error(exc: OSError | SafetensorError) -> OSError:
    """The OSError behind a failed write; safetensors reports one as text ending "(os error 28)"."""
    if isinstance(exc, OSError):
        return exc
    m = re.search(r"\(os error (\d+)\)", str(exc))
    if m is None:
        raise exc  # not an I/O failure: a bug, keep its traceback
    return OSError(int(m[1]), os.strerror(int(m[1])))


class ShardWriter:
    """Write tensors one at a time into size-capped safetensors shards."""

    def __init__(self, out_dir: Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter.add after close")
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.out_dir / f".shard-{len(self._written) + 1:05d}.partial"
        try:
            save_file(self._pending, str(path), metadata={"format": "pt"})
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        except (OSError, SafetensorError) as exc:
            path.unlink(missing_ok=True)
            raise WriteError(path, _os_error(exc)) from None
        log.debug("wrote shard %s (%d tensors, %.1f MB)", path.name, len(self._pending),
                  self._pending_bytes / 1e6)
        self._written.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> list[Path]:
        """Flush, give the shards their final names, write the index; returns the shard paths."""
        self._flush()
        self._closed = True
        n = len(self._written)
        final: list[Path] = []
        weight_map: dict[str, str] = {}
        for i, (tmp, names) in enumerate(self._written, start=1):
            name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            dest = self.out_dir / name
            os.chmod(tmp, 0o644)  # save_file creates 0600; a checkpoint is meant to be shared
            os.replace(tmp, dest)
            final.append(dest)
            weight_map.update({t: name for t in names})
        if n > 1:
            write_json_atomic(
                self.out_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
            )
        fsync_dir(self.out_dir)
        return final
