"""Safetensors shard writer that streams: the layout is fixed up front, one tensor is held at a time.

The caller declares every tensor (name, dtype, shape) before writing any. From that the writer splits
them into size-capped shards and computes each shard's safetensors header (names, dtypes, shapes, data
offsets), so each tensor can be written at its offset as soon as it is produced and dropped. The bytes
are those ``safetensors.torch.save_file`` writes for the same tensors (header JSON in its order, data
sorted by dtype then name, header padded with spaces to 8 bytes). Shards are written under temporary
names and fsynced when their last tensor lands; ``close`` renames them to the Hugging Face names
(``model.safetensors`` for one shard, ``model-0000i-of-0000N.safetensors`` plus
``model.safetensors.index.json`` for more).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import WriteError
from .atomic import fsync_dir, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2 * 1024**3
_MAX_WRITE = 1 << 30  # bytes per pwrite call (Linux writes at most ~2 GiB per call)

# safetensors' dtype names, in the order of its Rust enum: save_file lays tensors out by this order,
# descending, then by name.
_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64",
}
_RANK = {name: i for i, name in enumerate(_DTYPES.values())}


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    """A tensor the writer will be given: what its header entry says before its bytes exist."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(slots=True)
class _Shard:
    tensors: list[PlannedTensor]
    offsets: dict[str, int] = field(default_factory=dict)  # absolute file offset of each tensor
    header: bytes = b""
    size: int = 0
    remaining: set[str] = field(default_factory=set)
    path: Path | None = None
    fd: int | None = None


def safetensors_header(tensors: Iterable[PlannedTensor], metadata: dict[str, str] | None = None
                       ) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """(the 8-byte length + padded JSON header, data offsets relative to the data section) that
    ``save_file`` writes for these tensors."""
    order = sorted(tensors, key=lambda t: (-_RANK[_DTYPES[t.dtype]], t.name))
    head: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for t in order:
        offsets[t.name] = (pos, pos + t.nbytes)
        head[t.name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class ShardWriter:
    """Write declared tensors, one at a time, into size-capped safetensors shards."""

    def __init__(self, out_dir: Path, tensors: Iterable[PlannedTensor], *,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._shards: list[_Shard] = []
        self._where: dict[str, tuple[_Shard, PlannedTensor]] = {}
        size = 0
        for t in tensors:  # greedy, in the order given: a shard is full before the next one starts
            if t.name in self._where:
                raise ValueError(f"tensor {t.name!r} declared twice")
            if t.dtype not in _DTYPES:
                raise ValueError(f"tensor {t.name!r}: dtype {t.dtype} has no safetensors name")
            if not self._shards or (self._shards[-1].tensors and size + t.nbytes > max_shard_bytes):
                self._shards.append(_Shard(tensors=[]))
                size = 0
            self._shards[-1].tensors.append(t)
            self._where[t.name] = (self._shards[-1], t)
            size += t.nbytes
        for shard in self._shards:
            shard.header, rel = safetensors_header(shard.tensors, {"format": "pt"})
            shard.offsets = {name: len(shard.header) + a for name, (a, _) in rel.items()}
            shard.size = len(shard.header) + sum(t.nbytes for t in shard.tensors)
            shard.remaining = {t.name for t in shard.tensors}
        self.total_bytes = sum(t.nbytes for _, t in self._where.values())
        self._closed = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` at its planned offset; nothing of it is kept."""
        if self._closed:
            raise RuntimeError("ShardWriter.add after close")
        if name not in self._where:
            raise ValueError(f"tensor {name!r} was not declared to the writer")
        shard, planned = self._where[name]
        if name not in shard.remaining:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, but "
                             f"{planned.dtype} {list(planned.shape)} was declared")
        if shard.fd is None:
            self._open(shard)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # a view, no copy
        view = memoryview(data)
        pos = shard.offsets[name]
        try:
            while view.nbytes:
                n = os.pwrite(shard.fd, view[:_MAX_WRITE], pos)
                view, pos = view[n:], pos + n
        except OSError as exc:
            self._abandon(shard)
            raise WriteError(shard.path, exc) from None
        shard.remaining.discard(name)
        if not shard.remaining:
            self._finish(shard)

    def _open(self, shard: _Shard) -> None:
        shard.path = self.out_dir / f".shard-{self._shards.index(shard) + 1:05d}.partial"
        try:
            shard.fd = os.open(shard.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(shard.fd, shard.header, 0)
            os.ftruncate(shard.fd, shard.size)  # the data section, filled in as tensors arrive
        except OSError as exc:
            self._abandon(shard)
            raise WriteError(shard.path, exc) from None

    def _finish(self, shard: _Shard) -> None:
        try:
            os.fsync(shard.fd)
            os.close(shard.fd)
        except OSError as exc:
            self._abandon(shard)
            raise WriteError(shard.path, exc) from None
        shard.fd = None
        log.debug("wrote shard %s (%d tensors, %.1f MB)", shard.path.name, len(shard.tensors),
                  shard.size / 1e6)

    def _abandon(self, shard: _Shard) -> None:
        if shard.fd is not None:
            os.close(shard.fd)
            shard.fd = None
        if shard.path is not None:
            shard.path.unlink(missing_ok=True)

    def abort(self) -> None:
        """Close and remove the shards begun (after a failure elsewhere); the writer is then spent."""
        self._closed = True
        for shard in self._shards:
            self._abandon(shard)

    def close(self) -> list[Path]:
        """Give the shards their final names and write the index; returns the shard paths."""
        missing = [n for s in self._shards for n in s.remaining]
        if missing:
            raise RuntimeError(f"ShardWriter.close with {len(missing)} declared tensors never written "
                               f"(first: {missing[0]!r})")
        self._closed = True
        n = len(self._shards)
        final: list[Path] = []
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(self._shards, start=1):
            name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            dest = self.out_dir / name
            os.replace(shard.path, dest)
            final.append(dest)
            weight_map.update({t.name: name for t in shard.tensors})
        if n > 1:
            write_json_atomic(
                self.out_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
            )
        fsync_dir(self.out_dir)
        return final
