"""Lazy reader of a Hugging Face safetensors checkpoint.

Nothing is read until a tensor is asked for; tensors come out of the shards' memory maps one at a
time. Every problem with the files is a :class:`UserError` naming the file and the fix.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError
from .adapters import Adapter, adapter_for
from .config import ModelConfig, load_config
from .tensors import USED, Presence, dim_sizes

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TOKENIZER_FILES = (  # copied beside a pruned checkpoint's shards
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "chat_template.json",
)

# Weights are floating point; integer or boolean tensors are refused, never cast.
WEIGHT_DTYPES = ("F32", "F16", "BF16")
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def inputs_of(model_dir: Path) -> tuple[Path, ...]:
    """A model folder and the files in it the tools read (config, plan, weights and their index,
    tokenizer): what no output of a command reading it may replace (``check_output_path``'s
    inputs). A model file alone (a GGUF): just itself."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return (folder,)
    names = {"config.json", "plan.json", INDEX_NAME, *TOKENIZER_FILES}
    return (folder, *(p for p in sorted(folder.iterdir())
                      if p.is_file() and (p.name in names or p.suffix == ".safetensors")))


@dataclass(frozen=True, slots=True)
class TensorInfo:
    shard: Path
    shape: tuple[int, ...]
    dtype: str


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a shard's header and check that every tensor it declares lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            n = int.from_bytes(raw, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(
            f"{path}: not a readable safetensors file ({exc}); re-download or re-create it"
        ) from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: the safetensors header is not a JSON object; re-create the file")
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = meta["data_offsets"]
            shape, dtype = tuple(meta["shape"]), meta["dtype"]
            if not (_is_count(begin) and _is_count(end) and all(_is_count(d) for d in shape)
                    and isinstance(dtype, str)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt header entry for '{name}' (data_offsets, shape and "
                            "dtype must be integers, integers and a string); re-create the file") from None
        if end > data_size or begin > end:
            raise UserError(
                f"{path}: tensor '{name}' ends at byte {end} but the file holds {data_size} data "
                "bytes (truncated download?); re-download the shard"
            )
        out[name] = TensorInfo(path, shape, dtype)
    return out


class Checkpoint:
    """A checkpoint folder: config.json plus one or more safetensors shards."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = Path(model_dir)
        self.config: ModelConfig = load_config(self.dir)
        self.adapter: Adapter = adapter_for(self.config.architecture,
                                            source=str(self.dir / "config.json"))
        self.tensors = self._index()
        self._check_tensors()
        self._handles: dict[Path, object] = {}
        self._lock = threading.Lock()
        self.overlays: tuple[Path, ...] = ()  # files laid over the source (:meth:`with_overlay`)

    def _index(self) -> dict[str, TensorInfo]:
        index_path = self.dir / INDEX_NAME
        single = self.dir / SINGLE_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
                raise UserError(f"{index_path}: not a valid index (needs a 'weight_map' object)") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v
                    for k, v in weight_map.items()):
                raise UserError(f"{index_path}: 'weight_map' must map tensor names to shard file "
                                "names in the same folder; re-download the index")
            shards = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, shards = None, [SINGLE_NAME]
        else:
            raise UserError(
                f"{self.dir}: no {SINGLE_NAME} or {INDEX_NAME}; expected safetensors weights "
                "(convert .bin checkpoints with transformers' save_pretrained first)"
            )
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            path = self.dir / shard
            if not path.is_file():
                raise UserError(f"{index_path}: names shard '{shard}', which is missing in {self.dir}")
            tensors.update(_read_header(path))
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in tensors or tensors[name].shard.name != shard:
                    raise UserError(
                        f"{index_path}: names tensor '{name}' in '{shard}', which does not hold it; "
                        "the index and shards disagree (re-download them together)"
                    )
        return tensors

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight config.json implies, by tensor name, with its shape (from the tensor table;
        OPTIONAL ones are not implied, :meth:`_check_tensors` checks their shape when present)."""
        return {name: shape for name, (shape, required) in self._table_shapes().items() if required}

    def _table_shapes(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """Each tensor of the table this model may hold: its shape and whether it must be there."""
        cfg = self.config
        out: dict[str, tuple[tuple[int, ...], bool]] = {}
        for spec in USED:
            required = spec.required(attention_bias=cfg.attention_bias)
            if spec.presence is Presence.ATTENTION_BIAS and not required:
                continue  # a bias the config says there is not: left to the executor, as before
            layers = list(enumerate(cfg.layers)) if spec.per_layer else [(None, cfg.layers[0])]
            for i, s in layers:
                sizes = dim_sizes(vocab=cfg.vocab_size, hidden=cfg.hidden_size,
                                  heads=s.num_attention_heads, kv_heads=s.num_key_value_heads,
                                  head_dim=cfg.head_dim, channels=s.intermediate_size)
                out[self.name(spec.key, i)] = (spec.shape(sizes), required)
        return out

    def _check_tensors(self) -> None:
        """Before any work: the weights are the ones config.json describes, and floating point."""
        cfg, config_path = self.config, self.dir / "config.json"
        for name, info in self.tensors.items():
            if info.dtype not in WEIGHT_DTYPES:
                raise UserError(f"{info.shard}: tensor '{name}' is stored as {info.dtype}; expected "
                                f"floating-point weights ({', '.join(WEIGHT_DTYPES)}); a quantized "
                                "or corrupt checkpoint cannot be read (convert it to float16 first)")
            m = _LAYER_NAME.match(name)
            if m and int(m.group(1)) >= cfg.num_hidden_layers:
                raise UserError(f"{info.shard}: holds '{name}' but {config_path} has "
                                f"num_hidden_layers={cfg.num_hidden_layers}; the config and the "
                                "weights belong to different models")
        lm_head = self.name("lm_head")
        for name, (shape, required) in self._table_shapes().items():
            info = self.tensors.get(name)
            if info is None:
                if not required or (name == lm_head and cfg.tie_word_embeddings):
                    continue
                raise UserError(f"{self.dir}: tensor '{name}' is missing from the checkpoint "
                                f"({config_path} implies it); re-download or re-create the weights")
            if info.shape != shape:
                raise UserError(
                    f"{info.shard}: tensor '{name}' has shape {list(info.shape)} but config.json "
                    f"implies {list(shape)}; the config and the weights belong to different models"
                )

    def with_overlay(self, files: list[Path]) -> Checkpoint:
        """This checkpoint with the tensors of more safetensors files laid over its own (a repair).

        A name in ``files`` replaces the source's tensor of that name; new names are added.
        """
        other = copy.copy(self)
        other.tensors = dict(self.tensors)
        for path in files:
            other.tensors.update(_read_header(Path(path)))
        other.overlays = (*self.overlays, *map(Path, files))
        other._handles, other._lock = {}, threading.Lock()
        return other

    def name(self, key: str, layer: int | None = None) -> str:
        template = self.adapter.names[key]
        return template.format(layer) if layer is not None else template

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def _handle(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise UserError(f"{path}: cannot be opened as safetensors ({exc}); re-create it") from None
        return self._handles[path]

    def get(self, name: str, *, expect: tuple[int, ...] | None = None,
            rows: slice | None = None) -> torch.Tensor:
        """Read one tensor (or a contiguous range of its rows) from its shard's memory map."""
        info = self.tensors.get(name)
        if info is None:
            raise UserError(f"{self.dir}: tensor '{name}' is missing from the checkpoint")
        if expect is not None and info.shape != expect:
            raise UserError(
                f"{info.shard}: tensor '{name}' has shape {list(info.shape)} but config.json implies "
                f"{list(expect)}; the config and the weights belong to different models"
            )
        with self._lock:
            handle = self._handle(info.shard)
            try:
                if rows is None:
                    return handle.get_tensor(name)
                return handle.get_slice(name)[rows]
            except SafetensorError as exc:
                raise UserError(f"{info.shard}: reading '{name}' failed ({exc}); re-create the shard") from None

    def find_nonfinite(self, names: list[str], *, rows: int = 4096) -> str | None:
        """The first of ``names`` that holds a NaN or Inf (read ``rows`` rows at a time), or None."""
        for name in names:
            if name not in self.tensors:
                continue
            for a in range(0, self.shape(name)[0], rows):
                if not torch.isfinite(self.get(name, rows=slice(a, a + rows))).all():
                    return name
        return None

    def nonfinite_error(self, *, found: str, layer: int | None = None) -> UserError:
        """The error for a NaN or Inf that a pass met in block ``layer`` (None: somewhere).

        It names the tensor holding one (a corrupt checkpoint) or, when the weights read are all
        finite, says the computation overflowed. Only the suspects are read: the block, and the
        embedding for block 0; for None the head and norm first, then everything.
        """
        blocks = [t for t in self.adapter.names.values() if "{}" in t]
        embed = self.name("embed")
        if layer is None:
            suspects = [self.name("final_norm"), self.name("lm_head"), embed]
            suspects += [t.format(i) for i in range(self.config.num_hidden_layers) for t in blocks]
        else:
            suspects = ([embed] if layer == 0 else []) + [t.format(layer) for t in blocks]
        bad = self.find_nonfinite(suspects)
        if bad is not None:
            return UserError(f"{self.tensors[bad].shard}: tensor '{bad}' holds NaN or Inf ({found} "
                             "is not finite); the checkpoint is corrupt: re-download or re-create it")
        return UserError(f"{self.dir}: {found} is NaN or Inf although the weights are finite: the "
                         "computation overflowed; set compute_dtype = \"float32\" in the profile")

    def close(self) -> None:
        with self._lock:
            self._handles.clear()
