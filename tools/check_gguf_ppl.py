"""llama.cpp's perplexity of exported models against our streamed eval of the same checkpoints.

Each checkpoint (dense, or pruned and repaired: uneven widths, o_proj / down_proj biases) is exported
to GGUF, then measured on the same windows by ``lowmem-bonsai eval`` twice: the folder (streamed,
float32) and the GGUF (llama.cpp). Writes one JSON with both figures, their relative difference,
the GGUF's architecture and how many bias tensors it carries.

    python tools/check_gguf_ppl.py --models p20=runs/p20 p50=runs/p50 --out runs/gguf_ppl.json \
        --skip 1037 --max-seqs 32 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lowmem_bonsai.evaluate import evaluate  # noqa: E402
from lowmem_bonsai.llamacpp.from_gguf import open_gguf  # noqa: E402
from lowmem_bonsai.llamacpp.runner import gguf_perplexity  # noqa: E402
from lowmem_bonsai.llamacpp.to_gguf import export_gguf  # noqa: E402
from lowmem_bonsai.machine import host_info  # noqa: E402
from lowmem_bonsai.outputs.atomic import write_json_atomic  # noqa: E402
from lowmem_bonsai.texts import text_file  # noqa: E402


def gguf_facts(path: Path) -> dict:
    reader = open_gguf(path)  # a read-only memory map, closed when the reader is collected
    names = [t.name for t in reader.tensors]
    return {"architecture": reader.get_field("general.architecture").contents(),
            "attn_output_biases": sum(n.endswith("attn_output.bias") for n in names),
            "ffn_down_biases": sum(n.endswith("ffn_down.bias") for n in names)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="NAME=CHECKPOINT_DIR ...")
    ap.add_argument("--out", type=Path, required=True, help="the JSON to write")
    ap.add_argument("--data", default="wikitext2-valid", help="a text file, or a bundled text's name")
    ap.add_argument("--type", default="f16", help="GGUF type to export (f16, f32, q8_0, ...)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-seqs", type=int, default=32)
    ap.add_argument("--skip", type=int, default=1037)
    args = ap.parse_args(argv)
    models: dict[str, Path] = {}
    for spec in args.models:  # all checked before any work
        name, _, folder = spec.partition("=")
        if not name or not folder or "/" in name or name in models:
            ap.error(f"--models takes NAME=CHECKPOINT_DIR with distinct names without '/', got '{spec}'")
        if not (Path(folder) / "config.json").is_file():
            ap.error(f"--models {spec}: {folder} is not a checkpoint folder (no config.json)")
        models[name] = Path(folder)
    data = text_file(args.data)
    window = dict(data=data, seq_len=args.seq_len, max_seqs=args.max_seqs, skip=args.skip)
    out = {"windows": {**window, "data": args.data}, "host": host_info(), "rows": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, folder in models.items():
        with tempfile.TemporaryDirectory(dir=args.out.parent) as tmp:  # one GGUF at a time, beside --out
            path = export_gguf(model_dir=folder, out=Path(tmp) / f"{name}.gguf", type=args.type)
            facts = gguf_facts(path)
            ours = evaluate(model_dir=folder, **window)
            ref = gguf_perplexity(gguf=path, **window)
        if ref.tokens != ours.tokens:
            raise SystemExit(f"{name}: llama.cpp read {ref.tokens} tokens, our eval {ours.tokens}")
        row = {"name": name, "model": folder.name,  # the folder, not where it lived
               "type": args.type, **facts,
               "tokens": ours.tokens, "ours": ours.perplexity, "llama_cpp": ref.perplexity,
               "relative_difference": ref.perplexity / ours.perplexity - 1,
               "max_window_nll_difference": max(abs(a - b) for a, b in zip(ref.window_nll, ours.window_nll))}
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
        write_json_atomic(args.out, out)  # after every model: a later failure keeps the rows so far


if __name__ == "__main__":
    main()
