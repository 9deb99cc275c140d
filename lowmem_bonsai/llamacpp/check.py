"""What a GGUF file claims, checked against its size before anything trusts it.

gguf-py's reader and llama.cpp both believe a file's counts: a 456 KB file that claims 10^8 layers
or a metadata array of 2^40 elements costs them minutes and all memory, and some impossible
geometries make llama.cpp abort the process. :func:`scan_gguf` walks the header with every count
bounded by the bytes that remain (an array of N elements needs at least N bytes), so a hostile
header is refused in milliseconds; :func:`check_for_llama` then checks what llama.cpp would assert
on for the Llama-family architectures this project writes (``llama``, ``deci``).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import UserError
from .layout import check_gguf_file

# GGUF value types: struct format of the fixed-size ones; 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_KEEP_ARRAY = 1 << 16  # numeric arrays up to this length are kept (per-layer counts); longer: skipped
_FIX = "the file is truncated or corrupt, re-download it"


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    ne: tuple[int, ...]  # ggml order: innermost dimension first
    type: int
    offset: int  # from the start of the data section


@dataclass(frozen=True, slots=True)
class GgufSummary:
    """The metadata (string arrays and long arrays by their lengths only) and the tensor table."""

    path: Path
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: dict[str, TensorEntry]


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.at, self.path = buf, 0, path

    def fail(self, what: str) -> UserError:
        return UserError(f"{self.path}: {what} (at byte {self.at}); {_FIX}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.at + n > len(self.buf):
            raise self.fail(f"{what} needs {n} bytes but the file has {len(self.buf) - self.at} left")

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buf, self.at)[0]
        self.at += size
        return value

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.at:self.at + n])
        self.at += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, kind: int, what: str, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind != _ARRAY or depth > 0:  # llama.cpp reads no arrays of arrays
            raise self.fail(f"{what} has value type {kind}, which GGUF does not define here")
        elem = self.unpack("<I", what)
        count = self.unpack("<Q", what)
        least = struct.calcsize(_SCALARS[elem]) if elem in _SCALARS else 8 if elem == _STRING else 0
        if not least:
            raise self.fail(f"{what} is an array of value type {elem}, which GGUF does not define")
        # An array of N elements needs at least N times its smallest element: checked before reading.
        self.need(count * least, f"{what}, an array of {count} elements,")
        if elem == _STRING:
            for _ in range(count):
                n = self.unpack("<Q", what)
                self.need(n, what)
                self.at += n
            return _Skipped(count)
        if count > _KEEP_ARRAY:
            self.at += count * least
            return _Skipped(count)
        fmt = _SCALARS[elem]
        values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.at))
        self.at += count * least
        return values


@dataclass(frozen=True, slots=True)
class _Skipped:
    count: int


def scan_gguf(path: Path) -> GgufSummary:
    """The header of ``path``, every count bounded by the file's size; one-line UserErrors."""
    path = check_gguf_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _scan(_Cursor(buf, path), size)
        finally:
            buf.release()


def _scan(c: _Cursor, size: int) -> GgufSummary:
    c.at = 4
    version = c.unpack("<I", "the version")
    if version not in (2, 3):
        raise c.fail(f"GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors = c.unpack("<Q", "the tensor count")
    n_kv = c.unpack("<Q", "the metadata count")
    # Each metadata entry takes at least 13 bytes, each tensor entry at least 24.
    if n_kv * 13 + n_tensors * 24 > size:
        raise c.fail(f"the header claims {n_kv} metadata entries and {n_tensors} tensors, more "
                     f"than a file of {size} bytes can hold")
    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = c.string("a metadata key")
        kind = c.unpack("<I", f"metadata '{key}'")
        value = c.value(kind, f"metadata '{key}'")
        if isinstance(value, _Skipped):
            lengths[key] = value.count
        else:
            if isinstance(value, list):
                lengths[key] = len(value)
            metadata[key] = value
    tensors: dict[str, TensorEntry] = {}
    for _ in range(n_tensors):
        name = c.string("a tensor name")
        n_dims = c.unpack("<I", f"tensor '{name}'")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise c.fail(f"tensor '{name}' has {n_dims} dimensions, expected 1 to {_MAX_DIMS}")
        ne = tuple(c.unpack("<Q", f"tensor '{name}'") for _ in range(n_dims))
        ttype = c.unpack("<I", f"tensor '{name}'")
        offset = c.unpack("<Q", f"tensor '{name}'")
        tensors[name] = TensorEntry(name, ne, ttype, offset)
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align < 1 or align & (align - 1):
        raise c.fail(f"general.alignment is {align!r}, expected a power of two")
    data_start = -(-c.at // align) * align
    for t in tensors.values():
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.type)]
        except (ValueError, KeyError):
            raise c.fail(f"tensor '{t.name}' has ggml type {t.type}, which is not known") from None
        count = math.prod(t.ne)
        if t.ne[0] % block:
            raise c.fail(f"tensor '{t.name}' has rows of {t.ne[0]} values, not a multiple of its "
                         f"type's block of {block}")
        end = data_start + t.offset + count // block * type_size
        if end > size:
            raise c.fail(f"tensor '{t.name}' ({list(t.ne)}) ends at byte {end}, past the end of "
                         f"the file ({size} bytes)")
    return GgufSummary(c.path, metadata, lengths, tensors)


# --- what llama.cpp asserts on ----------------------------------------------------------------

def _counts(s: GgufSummary, key: str, n_layers: int, *, required: bool = True,
            default: int | None = None) -> list[int]:
    """A scalar or per-layer metadata count, as one non-negative int per layer."""
    value = s.metadata.get(key, default)
    if value is None:
        if key in s.array_lengths:
            raise UserError(f"{s.path}: metadata '{key}' is an array of {s.array_lengths[key]}, "
                            f"expected {n_layers} per-layer counts; {_FIX}")
        if required:
            raise UserError(f"{s.path}: metadata '{key}' is missing; re-export the model")
        return []
    values = value if isinstance(value, list) else [value] * n_layers
    if len(values) != n_layers or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise UserError(f"{s.path}: metadata '{key}' is {_short(value)}, expected a count or "
                        f"{n_layers} per-layer counts; {_FIX}")
    return values


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_for_llama(path: Path) -> GgufSummary:
    """Refuse what would make llama.cpp abort instead of failing: impossible counts, GQA groups
    that do not divide, and tensor shapes that disagree with the metadata."""
    s = scan_gguf(path)
    arch = s.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"{s.path}: metadata 'general.architecture' is {_short(arch)}, expected a "
                        f"name such as 'llama'; {_FIX}")
    if arch not in ("llama", "deci"):
        return s  # other architectures are left to llama.cpp's own checks
    n_layers = s.metadata.get(f"{arch}.block_count")
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
        raise UserError(f"{s.path}: metadata '{arch}.block_count' is {_short(n_layers)}, expected a "
                        f"positive count; {_FIX}")
    if n_layers > len(s.tensors):
        raise UserError(f"{s.path}: metadata '{arch}.block_count' is {n_layers} but the file holds "
                        f"{len(s.tensors)} tensors, too few for that many blocks; {_FIX}")
    for key in ("attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor"):
        value = s.metadata.get(f"{arch}.{key}")  # a NaN epsilon makes llama.cpp abort (SIGABRT)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value) or value <= 0):
            raise UserError(f"{s.path}: metadata '{arch}.{key}' is {_short(value)}, expected a "
                            f"positive finite number; {_FIX}")
    hidden = _counts(s, f"{arch}.embedding_length", 1)[0]
    heads = _counts(s, f"{arch}.attention.head_count", n_layers)
    kv = _counts(s, f"{arch}.attention.head_count_kv", n_layers, default=s.metadata.get(
        f"{arch}.attention.head_count"))
    ffn = _counts(s, f"{arch}.feed_forward_length", n_layers)
    most = max(heads)
    if hidden < 1 or most < 1:
        raise UserError(f"{s.path}: embedding_length {hidden} with {most} heads; {_FIX}")
    head_dim = _counts(s, f"{arch}.attention.key_length", 1, default=hidden // most)[0]
    v_dim = _counts(s, f"{arch}.attention.value_length", 1, default=head_dim)[0]
    if head_dim != v_dim or head_dim < 2 or head_dim % 2:
        raise UserError(f"{s.path}: key_length {head_dim} and value_length {v_dim}; expected one "
                        f"even head size; {_FIX}")
    vocab = s.array_lengths.get("tokenizer.ggml.tokens")
    expect: dict[str, tuple[int, ...]] = {"token_embd.weight": (hidden, vocab or -1),
                                          "output_norm.weight": (hidden,),
                                          "output.weight": (hidden, vocab or -1)}
    for i in range(n_layers):
        if heads[i] and (not kv[i] or heads[i] % kv[i]):
            raise UserError(f"{s.path}: block {i} has {heads[i]} query heads for {kv[i]} KV heads; "
                            "llama.cpp needs the first to be a multiple of the second; " + _FIX)
        q, k = heads[i] * head_dim, kv[i] * head_dim
        expect.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.attn_q.weight": (hidden, q), f"blk.{i}.attn_k.weight": (hidden, k),
                       f"blk.{i}.attn_v.weight": (hidden, k), f"blk.{i}.attn_output.weight": (q, hidden),
                       f"blk.{i}.ffn_gate.weight": (hidden, ffn[i]), f"blk.{i}.ffn_up.weight": (hidden, ffn[i]),
                       f"blk.{i}.ffn_down.weight": (ffn[i], hidden)})
    if "token_embd.weight" not in s.tensors:
        raise UserError(f"{s.path}: tensor 'token_embd.weight' is missing; {_FIX}")
    for name, t in s.tensors.items():
        want = expect.get(name)
        if want is None:
            continue
        if vocab is None and name in ("token_embd.weight", "output.weight"):
            want = (hidden, t.ne[1] if len(t.ne) > 1 else -1)
        got = tuple(t.ne) + (1,) * (len(want) - len(t.ne)) if len(t.ne) < len(want) else tuple(t.ne)
        if got != want:
            raise UserError(f"{s.path}: tensor '{name}' has shape {list(t.ne)}, expected {list(want)} "
                            f"from the metadata (ggml order); {_FIX}")
    return s


def trained_context(s: GgufSummary) -> int | None:
    """The context the GGUF's metadata says the model runs at (None: not stated): its trained
    context_length, times its rope scaling factor where it has one (linear, YaRN)."""
    arch = s.metadata.get("general.architecture")
    value = s.metadata.get(f"{arch}.context_length")
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return None
    factor = s.metadata.get(f"{arch}.rope.scaling.factor")
    scaled = s.metadata.get(f"{arch}.rope.scaling.type") not in (None, "none")
    if scaled and isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 1:
        return int(value * factor)  # (check_for_llama refused a factor that is not finite)
    return value


def checked_gguf(gguf: Path) -> GgufSummary:
    """The header of the model file ``gguf`` that ``generate``, ``eval`` and ``serve`` hand to
    llama.cpp, once what would make llama.cpp abort the process is refused."""
    check_gguf_file(gguf, hint="pass a llama.cpp .gguf model (lowmem-bonsai export-gguf makes one)")
    return check_for_llama(gguf)
