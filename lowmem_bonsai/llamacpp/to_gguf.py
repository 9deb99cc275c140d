"""A checkpoint folder (dense or pruned) as one GGUF file that llama.cpp serves.

Library side of ``lowmem-bonsai export-gguf MODEL_DIR --out FILE.gguf``.

- Architecture: uniform models keep llama.cpp's own graph for their family (the adapter's
  ``gguf_arch``);
  layers of different widths need ``deci`` (Nemotron-51B's graph), the only one that builds every
  layer from its own head and FFN counts, written as per-layer arrays.
- Everything is checked before a byte is written (shapes, GQA groups, quantization alignment,
  tokenizer): llama.cpp aborts the whole process on what it cannot handle, and silently stores
  rows its quantizer cannot handle in another type.
- Verified with llama-cpp-python 0.3.36: ``deci`` loads q/k/v biases at each layer's own width
  (pruned Qwen2), and every tiny family's logits match transformers' to 1e-6.
- Tensors are streamed: the header and tensor table go first (gguf-py's info-first API), then each
  tensor is read from the shards' memory maps in row chunks, reordered, converted and written, so
  memory stays near one output tensor. K-quants and the other block types gguf-py cannot write are
  made by llama.cpp's own quantizer from a temporary F16 GGUF.
- The file appears under its name only when complete (temporary name, fsync, rename).
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ..engine.memory import RUNTIME_GB, STORAGE_BYTES
from ..engine.rope import llama3_params, llama3_rope_factors
from ..errors import UserError, WriteError
from ..model.adapters import Adapter
from ..model.checkpoint import Checkpoint, inputs_of
from ..model.config import LayerShape, ModelConfig
from ..model.tensors import LAYER_TENSORS, SPECS, Dim, Presence, TensorSpec, dim_sizes
from ..outputs.atomic import check_output_path, fsync_dir
from .layout import ROPE_FREQS, permute_qk
from .vocab_to_gguf import vocab_from_checkpoint, write_vocab

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType


@dataclass(frozen=True, slots=True)
class ExportType:
    """One ``--type``: how matrices are stored, and whether llama.cpp's quantizer makes them."""

    matrix: gguf.GGMLQuantizationType  # what gguf-py writes for 2-D weights
    file_type: gguf.LlamaFileType
    block: int  # every matrix row length must be a multiple of this
    requantize: bool  # written as F16 first, then llama_model_quantize to file_type


TYPES: dict[str, ExportType] = {
    "f32": ExportType(Q.F32, FT.ALL_F32, 1, False),
    "f16": ExportType(Q.F16, FT.MOSTLY_F16, 1, False),
    "bf16": ExportType(Q.BF16, FT.MOSTLY_BF16, 1, False),
    "q8_0": ExportType(Q.Q8_0, FT.MOSTLY_Q8_0, 32, False),
    **{name: ExportType(Q.F16, ft, 32, True) for name, ft in (
        ("q4_0", FT.MOSTLY_Q4_0), ("q4_1", FT.MOSTLY_Q4_1), ("q5_0", FT.MOSTLY_Q5_0),
        ("q5_1", FT.MOSTLY_Q5_1))},
    **{name: ExportType(Q.F16, ft, 256, True) for name, ft in (
        ("q2_k", FT.MOSTLY_Q2_K), ("q3_k_s", FT.MOSTLY_Q3_K_S), ("q3_k_m", FT.MOSTLY_Q3_K_M),
        ("q3_k_l", FT.MOSTLY_Q3_K_L), ("q4_k_s", FT.MOSTLY_Q4_K_S), ("q4_k_m", FT.MOSTLY_Q4_K_M),
        ("q5_k_s", FT.MOSTLY_Q5_K_S), ("q5_k_m", FT.MOSTLY_Q5_K_M), ("q6_k", FT.MOSTLY_Q6_K))},
}

NONUNIFORM_ARCH = "deci"  # the graph for layers of different widths (rotates pairs, like llama)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some checkpoints carry; not weights
_CHUNK_ELEMENTS = 1 << 24  # rows converted at once: bounds the float32 scratch (64 MB)


@dataclass(frozen=True, slots=True)
class GgufTensorJob:
    """One GGUF tensor: where it comes from and how it is stored."""

    name: str  # GGUF name
    source: str | None  # HF name in the checkpoint; None: zeros (padding for a vanished module)
    shape: tuple[int, ...]  # torch order (rows, row length)
    qtype: gguf.GGMLQuantizationType
    permute_heads: int | None = None  # q/k: heads whose rows llama.cpp wants interleaved
    values: np.ndarray | None = None  # computed tensors (rope_freqs)

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * size


def export_layers(cfg: ModelConfig, etype: ExportType) -> list[LayerShape]:
    """Widths as written: a module the plan removed entirely becomes a minimal all-zero one.

    deci cannot load layer 0 without heads and loses a layer's attention output when its FFN
    width is 0; one zero head (zero q/k/v/o) or one block of zero channels adds exactly nothing.
    """
    out = []
    for s in cfg.layers:
        heads, kv = (s.num_attention_heads, s.num_key_value_heads) if s.num_attention_heads else (1, 1)
        out.append(LayerShape(heads, kv, s.intermediate_size or max(32, etype.block)))
    return out


def choose_arch(adapter: Adapter, cfg: ModelConfig, layers: list[LayerShape]) -> str:
    """The family's own graph for uniform widths, else deci."""
    uniform = all(s == layers[0] for s in layers) and layers == list(cfg.layers)
    return adapter.gguf_arch if uniform else NONUNIFORM_ARCH


def neox_rope(adapter: Adapter, arch: str) -> bool:
    """Whether ``arch`` rotates halves like HF (then q/k rows keep their order)."""
    return arch == adapter.gguf_arch and adapter.gguf_neox_rope


def validate(ckpt: Checkpoint, etype: ExportType, type_name: str) -> tuple[str, list[LayerShape]]:
    """Every reason llama.cpp would refuse or abort, found before anything is written."""
    cfg, source = ckpt.config, str(ckpt.dir)
    layers = export_layers(cfg, etype)
    arch = choose_arch(ckpt.adapter, cfg, layers)
    hd = cfg.head_dim
    if hd % 2:
        raise UserError(f"{source}: head_dim {hd} is odd; rotary embeddings need an even head_dim")
    for i, s in enumerate(cfg.layers):
        if s.num_attention_heads and (not s.num_key_value_heads
                                      or s.num_attention_heads % s.num_key_value_heads):
            raise UserError(f"{source}: layer {i} has {s.num_attention_heads} query heads for "
                            f"{s.num_key_value_heads} KV heads; llama.cpp needs a positive multiple "
                            "(equal groups); re-prune keeping whole KV groups")
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3" and neox_rope(ckpt.adapter, arch):
        raise UserError(f"{source}: llama3 rope scaling on a {arch} model; llama.cpp reads it only "
                        "for llama/deci; expected default or linear rope")
    if cfg.sliding_window is not None:
        log.warning("%s: sliding window %d is not written; llama.cpp attends to the whole context "
                    "(identical up to %d tokens)", source, cfg.sliding_window, cfg.sliding_window)
    if etype.block > 1:
        rows = {"hidden_size": cfg.hidden_size}
        for i, s in enumerate(layers):
            rows[f"layer {i} attention width (heads x head_dim)"] = s.num_attention_heads * hd
            rows[f"layer {i} FFN width"] = s.intermediate_size
        bad = {k: v for k, v in rows.items() if v % etype.block}
        # llama.cpp does not fail on these: it stores such matrices in another type. Widths that
        # are not even a multiple of 32 would stay F16 (a surprise in size): refused. Multiples of
        # 32 fall back to 32-block types, as llama.cpp's own quantizer does for the dense model
        # (SmolLM2's hidden size 576 is one): allowed, with a warning.
        f16 = {k: v for k, v in bad.items() if v % 32}
        if f16:
            what = "; ".join(f"{k} {v}" for k, v in list(f16.items())[:4])
            extra = f" and {len(f16) - 4} more" if len(f16) > 4 else ""
            raise UserError(f"--type {type_name} needs widths divisible by 32: {what}{extra}; llama.cpp "
                            "would silently keep those matrices in F16; pick --type f16/bf16/f32 or "
                            "prune with an alignment of 32")
        if bad:
            what = "; ".join(f"{k} {v}" for k, v in list(bad.items())[:3])
            log.warning("--type %s: %d widths are not divisible by %d (%s%s); llama.cpp stores those "
                        "matrices in 32-block types (q4_K->q5_0, q5_K->q5_1, q6_K->q8_0, "
                        "q2_K/q3_K->iq4_nl)", type_name, len(bad), etype.block, what,
                        ", ..." if len(bad) > 3 else "")
    return arch, layers


def _source(ckpt: Checkpoint, key: str, layer: int | None, shape: tuple[int, ...]) -> str:
    name = ckpt.name(key, layer)
    if not ckpt.has(name):
        raise UserError(f"{ckpt.dir}: tensor '{name}' is missing from the checkpoint")
    if ckpt.shape(name) != shape:
        raise UserError(f"{ckpt.dir}: tensor '{name}' has shape {list(ckpt.shape(name))} but "
                        f"config.json implies {list(shape)}; the config and the weights disagree")
    return name


def _exported(spec: TensorSpec, ckpt: Checkpoint, layer: int) -> bool:
    """Whether this model's GGUF has the tensor of ``spec`` in ``layer``."""
    if spec.required(attention_bias=ckpt.config.attention_bias):
        return True
    return spec.presence is Presence.OPTIONAL and ckpt.has(ckpt.name(spec.key, layer))


def export_jobs(ckpt: Checkpoint, arch: str, layers: list[LayerShape],
                etype: ExportType) -> list[GgufTensorJob]:
    """Every tensor of the GGUF, in file order; shapes are checked against the headers."""
    cfg = ckpt.config
    hd = cfg.head_dim
    neox = neox_rope(ckpt.adapter, arch)

    def job(spec: TensorSpec, layer: int | None, sizes: dict[Dim, int], *, present: bool = True,
            heads: int | None = None) -> GgufTensorJob:
        shape = spec.shape(sizes)
        qtype = etype.matrix if len(shape) == 2 else Q.F32  # norms and biases stay F32
        src = _source(ckpt, spec.key, layer, shape) if present else None
        permute = heads if present and heads and not neox else None
        return GgufTensorJob(spec.gguf.format(layer), src, shape, qtype, permute)

    def sizes_of(s: LayerShape) -> dict[Dim, int]:
        return dim_sizes(vocab=cfg.vocab_size, hidden=cfg.hidden_size, heads=s.num_attention_heads,
                         kv_heads=s.num_key_value_heads, head_dim=hd, channels=s.intermediate_size)

    top = sizes_of(cfg.layers[0])  # the embedding, final norm and lm_head do not depend on a layer
    jobs = [job(SPECS["embed"], None, top)]
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "llama3":
        factors = llama3_rope_factors(theta=cfg.rope_theta, head_dim=hd, **llama3_params(scaling))
        jobs.append(GgufTensorJob(ROPE_FREQS, None, (hd // 2,), Q.F32,
                                  values=factors.numpy().astype(np.float32)))
    for i, (s, w) in enumerate(zip(cfg.layers, layers)):
        real = {"attn": s.num_attention_heads > 0,  # else one zero head stands in
                "mlp": s.intermediate_size > 0, "": True}
        assert not real["attn"] or s == w or s.intermediate_size == 0, (i, s, w)
        heads = {Dim.HEADS: w.num_attention_heads, Dim.KV_HEADS: w.num_key_value_heads}
        jobs += [job(spec, i, sizes_of(w), present=real[spec.module],
                     heads=heads[spec.unit] if spec.rotary else None)
                 for spec in LAYER_TENSORS if _exported(spec, ckpt, i)]
    jobs.append(job(SPECS["final_norm"], None, top))
    if ckpt.has(ckpt.name("lm_head")) or not cfg.tie_word_embeddings:
        jobs.append(job(SPECS["lm_head"], None, top))  # the executor uses lm_head whenever present

    used = {j.source for j in jobs}
    # Zero-size tensors are modules the plan removed entirely (padded above or absent in GGUF).
    extra = sorted(n for n in ckpt.tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES)
                   and 0 not in ckpt.shape(n))
    if extra:
        raise UserError(f"{ckpt.dir}: tensor '{extra[0]}' ({len(extra)} unmapped in all) has no place in "
                        f"a llama.cpp {arch} GGUF; expected only the weights of a plain "
                        f"{cfg.architecture}; this checkpoint has parts the exporter does not know")
    return jobs


def _per_layer(values: list[int]) -> int | list[int]:
    # Plain Python ints: gguf-py rejects numpy integers in arrays.
    return int(values[0]) if len(set(values)) == 1 else [int(x) for x in values]


def _write_hparams(w: gguf.GGUFWriter, cfg: ModelConfig, arch: str, layers: list[LayerShape],
                   etype: ExportType, name: str) -> None:
    hd = cfg.head_dim
    heads = [s.num_attention_heads for s in layers]
    kv = [s.num_key_value_heads for s in layers]
    ffn = [s.intermediate_size for s in layers]
    as_arrays = arch == NONUNIFORM_ARCH  # deci reads arrays; llama/qwen2 size all layers like layer 0
    w.add_name(name)
    w.add_file_type(int(etype.file_type))
    if etype.file_type not in (FT.ALL_F32, FT.MOSTLY_F16, FT.MOSTLY_BF16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length([int(x) for x in ffn] if as_arrays else _per_layer(ffn))
    w.add_head_count([int(x) for x in heads] if as_arrays else _per_layer(heads))
    w.add_head_count_kv([int(x) for x in kv] if as_arrays else _per_layer(kv))
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))


def _convert(chunk: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Rows in any float dtype -> the bytes (or floats) GGUF stores for ``qtype``."""
    if qtype == Q.F32:
        return chunk.float().numpy()
    if qtype == Q.F16:
        return chunk.to(torch.float16).numpy()
    if qtype == Q.BF16:  # round to nearest even, like gguf-py; stored as raw 16-bit words
        return chunk.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(np.ascontiguousarray(chunk.float().numpy()), qtype)


def tensor_data(ckpt: Checkpoint, job: GgufTensorJob) -> np.ndarray:
    """One tensor as written: read in row chunks from the memory map, reordered, converted."""
    if job.values is not None:
        return job.values
    rows = job.shape[0]
    row_len = job.shape[-1] if len(job.shape) == 2 else 1
    step = max(1, _CHUNK_ELEMENTS // row_len)
    if job.permute_heads:  # whole heads per chunk: rows only move within a head
        d = rows // job.permute_heads
        step = max(d, step // d * d)
    out: np.ndarray | None = None
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        if job.source is None:
            chunk = torch.zeros((r1 - r0, *job.shape[1:]))
        else:
            chunk = ckpt.get(job.source, rows=slice(r0, r1))  # (rows, row_len) or (rows,)
            if job.permute_heads:
                chunk = permute_qk(chunk, (r1 - r0) // (rows // job.permute_heads))
        data = _convert(chunk, job.qtype)
        if out is None:
            out = np.empty((rows, *data.shape[1:]), dtype=data.dtype)
        out[r0:r1] = data
    assert out is not None and out.nbytes == job.nbytes, (job.name, out.shape, job.nbytes)
    return out


def export_peak_bytes(ckpt: Checkpoint, jobs: list[GgufTensorJob], etype: ExportType) -> int:
    """What an export holds at its peak: one tensor as written (:func:`tensor_data` builds it whole),
    the row chunk being converted (read in the source dtype, permuted, float32, converted), and for
    llama.cpp's quantizer the largest tensor in float32 with its quantized output."""
    src = max((STORAGE_BYTES.get(ckpt.tensors[j.source].dtype, 4) for j in jobs if j.source is not None),
              default=4)
    tensor = max(j.nbytes for j in jobs)
    chunk = _CHUNK_ELEMENTS * (2 * src + 4 + 4)
    largest = max(int(np.prod(j.shape, dtype=np.int64)) for j in jobs)
    requantize = largest * (4 + 2) if etype.requantize else 0
    return int(RUNTIME_GB * 1024**3 + tensor + chunk + requantize)


def _write_gguf(ckpt: Checkpoint, path: Path, *, arch: str, layers: list[LayerShape],
                jobs: list[GgufTensorJob], etype: ExportType, vocab, name: str) -> None:
    w = gguf.GGUFWriter(path, arch)
    _write_hparams(w, ckpt.config, arch, layers, etype, name)
    write_vocab(w, vocab)
    for job in jobs:
        # gguf-py takes the torch-order shape; a non-uint8 dtype keeps it in elements, not bytes
        w.add_tensor_info(job.name, job.shape, np.dtype(np.float32), job.nbytes, raw_dtype=job.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, job in enumerate(jobs):
        w.write_tensor_data(tensor_data(ckpt, job))
        log.debug("tensor %d/%d %s %s %s", i + 1, len(jobs), job.name, job.shape, job.qtype.name)
    w.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _requantize(src: Path, dst: Path, etype: ExportType) -> None:
    """llama.cpp's own quantizer, F16 GGUF -> ``etype``; embeddings and output kept at Q8_0."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError("K-quant and q4/q5 types are made by llama.cpp's quantizer, which needs "
                        "llama-cpp-python; pip install llama-cpp-python, or pick --type "
                        "f16/bf16/q8_0") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(etype.file_type)
    params.nthread = 0  # all cores
    params.token_embedding_type = int(Q.Q8_0)
    params.output_tensor_type = int(Q.Q8_0)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise UserError(f"llama.cpp could not quantize {src.name} to {etype.file_type.name} (status "
                        f"{rc}; its log above says why); expected this to work after validation, "
                        "so please report it; --type f16 or q8_0 avoids llama.cpp's quantizer")


def export_gguf(*, model_dir: Path, out: Path, type: str = "f16", force: bool = False) -> Path:
    """Write ``model_dir`` (dense or pruned) as a GGUF llama.cpp loads; returns ``out``."""
    if type not in TYPES:
        raise UserError(f"--type '{type}' is not supported; expected one of {', '.join(TYPES)}")
    etype = TYPES[type]
    model_dir, out = Path(model_dir), Path(out)
    check_output_path(out, folder=False, inputs=inputs_of(model_dir))
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --out names the .gguf file to write")
    if out.exists() and not force:
        raise UserError(f"{out}: exists; pass --force to replace it")
    ckpt = Checkpoint(model_dir)
    arch, layers = validate(ckpt, etype, type)
    jobs = export_jobs(ckpt, arch, layers, etype)
    vocab = vocab_from_checkpoint(model_dir, vocab_size=ckpt.config.vocab_size,
                                  config=ckpt.config.raw)
    log.info("memory plan: peak %.2f GiB (one tensor at a time)",
             export_peak_bytes(ckpt, jobs, etype) / 1024**3)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    f16 = out.with_name(f".{out.name}.f16-partial-{os.getpid()}")
    try:
        first = f16 if etype.requantize else tmp
        _write_gguf(ckpt, first, arch=arch, layers=layers, jobs=jobs, etype=etype, vocab=vocab,
                    name=model_dir.resolve().name)
        if etype.requantize:
            _requantize(f16, tmp, etype)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise WriteError(out, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
        f16.unlink(missing_ok=True)
        ckpt.close()
    fsync_dir(out.parent)
    log.info("wrote %s: arch %s, %d tensors, %s, %.1f MB", out, arch, len(jobs), type,
             out.stat().st_size / 1e6)
    return out
