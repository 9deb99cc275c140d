"""Is the memory plan an upper bound? Planned bytes against measured peak, under a memory cap.

Builds random-weight Llama-shaped checkpoints (tools/make_checkpoint.py: widths, heads and vocabulary
exact; the 7B and 13B shapes with fewer blocks, since a streamed run holds one block, the embeddings
and buffers whatever the depth: the 7B shape at 2, 6 and 12 blocks checks that), then runs ``prune``,
``eval``, ``export-gguf`` (f16; the 13B shape also q8_0 and llama.cpp's q4_k_m) and ``import-gguf``, each in its own process under
``memcap CAP -- ...``, which reports the peak anonymous memory. The planned peak is the product's
own: ``estimate --json`` for a prune (its ``memory.total_gb``), and the ``memory plan: ... peak X GiB``
line that ``eval``, ``export-gguf`` and ``import-gguf`` log with ``-v``. Figures go to a JSON file,
written after every run.

    python tools/bench_memory.py --memcap ../shared/bin/memcap --scratch /tmp/mem \\
        --json tools/results/memory_bound.json

A prune uses a small profile so that it finishes in minutes (4 masks x 2 x 64 tokens, 10 % in one
round; the 13B shape also with reconstruct = "lsq" over 8 x 128 tokens, and with the stream target
over 64 x 256 tokens, without and with reconstruct_reselect). The checkpoints get a
byte-level BPE tokenizer (make_checkpoint.py --bpe), which export-gguf can convert.

With ``--smollm2 DIR`` (an imported SmolLM2-135M, ``lowmem-bonsai import-gguf``) a shipped profile
is measured as it is ("profile:NAME": one round of 5 % with the profile's own waves of masks, row
chunks, prior pass and repair): the real model with ``laptop-16gb`` under 3G, where the lm_head and
the buffers freed between phases weigh most. "profile:NAME:rounds" runs the rounds alone (a copy
of the profile with ``reconstruct = "none"``): ``laptop-16gb``'s wave of 64 masks on the 13B shape
under 16G; "profile:NAME:prior" its repair as shipped, after the prior's plan to 50 % (``--method
prior``: no masks, each of the profile's rounds one pass), there too. A prune's row also keeps estimate's ETA beside its wall time.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
CLI = [PY, "-m", "lowmem_bonsai.cli"]
PROFILE = """compute_dtype = "float32"
masks_per_round = 4
calib_seqs = 2
seq_len = 64
prune_frac = 0.1
memory_gb = 16.0
reconstruct = "{reconstruct}"
reconstruct_seqs = {seqs}
reconstruct_seq_len = {seq_len}
reconstruct_target = "{target}"
reconstruct_reselect = {reselect}
"""
# (checkpoint, make_checkpoint shape, layers or None for the real depth)
MODELS = {
    "tinyllama-1.1b": ("tinyllama-1.1b", None),
    "llama2-7b-x2": ("llama2-7b", 2),
    "llama2-7b-x6": ("llama2-7b", 6),
    "llama2-7b-x12": ("llama2-7b", 12),
    "llama2-13b-x2": ("llama2-13b", 2),
}
# (model, command, cap = budget, reconstruct)
RUNS = [
    ("tinyllama-1.1b", "prune", "2G", "none"), ("tinyllama-1.1b", "prune", "4G", "none"),
    ("tinyllama-1.1b", "eval", "2G", ""), ("tinyllama-1.1b", "eval", "4G", ""),
    ("tinyllama-1.1b", "export-gguf", "2G", ""), ("tinyllama-1.1b", "import-gguf", "2G", ""),
    ("llama2-7b-x2", "prune", "4G", "none"), ("llama2-7b-x2", "prune", "6G", "none"),
    ("llama2-7b-x2", "eval", "4G", ""),
    ("llama2-7b-x6", "prune", "4G", "none"), ("llama2-7b-x6", "eval", "4G", ""),
    ("llama2-7b-x12", "prune", "4G", "none"), ("llama2-7b-x12", "eval", "4G", ""),
    ("llama2-7b-x2", "export-gguf", "2G", ""), ("llama2-7b-x2", "import-gguf", "2G", ""),
    ("llama2-13b-x2", "prune", "6G", "none"), ("llama2-13b-x2", "prune", "8G", "none"),
    ("llama2-13b-x2", "prune", "16G", "lsq"),
    # the dense model's stream beside the pruned one and the cross moments: 64 x 256 tokens
    ("llama2-13b-x2", "prune", "16G", "lsq-stream"),
    # and with the MLP channels reselected (the inverse of the Gram matrix beside it)
    ("llama2-13b-x2", "prune", "16G", "lsq-stream-reselect"),
    ("llama2-13b-x2", "eval", "6G", ""), ("llama2-13b-x2", "eval", "8G", ""),
    ("llama2-13b-x2", "export-gguf", "2G", ""), ("llama2-13b-x2", "import-gguf", "2G", ""),
    ("llama2-13b-x2", "export-gguf:q8_0", "2G", ""), ("llama2-13b-x2", "export-gguf:q4_k_m", "2G", ""),
    # a shipped profile as it is (its waves of masks, row chunks, prior pass and repair), on the
    # real model: with --smollm2 DIR
    ("smollm2-135m", "prune", "3G", "profile:laptop-16gb"),
    # its rounds alone on the 13B shape (one wave of 64 masks x 8 x 256 tokens): "profile:NAME:rounds"
    # prunes with a copy of the profile that sets reconstruct = "none"
    ("llama2-13b-x2", "prune", "16G", "profile:laptop-16gb:rounds"),
    # and its repair as shipped (256 + 32 chat windows, stream target, reselection) after the
    # prior's plan to 50 % (no masks; each round one pass): "profile:NAME:prior"
    ("llama2-13b-x2", "prune", "16G", "profile:laptop-16gb:prior"),
]
PLAN_LINE = re.compile(r"memory plan: .*peak ([0-9.]+) GiB")


def make(name: str, scratch: Path, given: dict[str, Path]) -> Path | None:
    if name in given or name not in MODELS:
        return given.get(name)
    shape, layers = MODELS[name]
    out = scratch / name
    if not (out / "config.json").is_file():
        subprocess.run([PY, str(ROOT / "tools" / "make_checkpoint.py"), shape, str(out), "--force", "--bpe",
                        *(["--layers", str(layers)] if layers else [])], check=True)
    return out


def command(model: Path, cmd: str, cap: str, reconstruct: str,
            scratch: Path) -> tuple[list[str], float | None, float | None]:
    """The command line to measure and, for a prune, its planned peak (GiB) and ETA (hours) from estimate."""
    out = scratch / "out" / f"{model.name}-{cmd}-{cap}-{reconstruct or 'x'}"
    gguf = scratch / "out" / f"{model.name}.gguf"
    if cmd == "prune":
        if reconstruct.startswith("profile:"):  # a shipped profile as it is
            # profile:NAME (one round of 5 %), profile:NAME:rounds (the same without the repair) or
            # profile:NAME:prior (the prior's rounds, one pass each, to 50 %, then the repair)
            _, name, *kind = reconstruct.split(":")
            if kind not in ([], ["rounds"], ["prior"]):
                raise ValueError(f"{reconstruct}: expected profile:NAME, profile:NAME:rounds or profile:NAME:prior")
            if kind == ["rounds"]:  # the shipped file with reconstruct = "none" (estimate has no --reconstruct)
                text, n = re.subn(r"^reconstruct\s*=.*$", 'reconstruct = "none"',
                                  (ROOT / "profiles" / f"{name}.toml").read_text(), flags=re.M)
                if n != 1:
                    raise ValueError(f"profiles/{name}.toml: expected one 'reconstruct = ' line, found {n}")
                name = str(scratch / f"bench-{name}-rounds.toml")
                Path(name).write_text(text)
            args = [str(model), "--profile", name, *(["--sparsity", "0.5", "--method", "prior"]
                                                      if kind == ["prior"] else ["--sparsity", "0.05"])]
        else:
            profile = scratch / f"bench-{reconstruct}.toml"
            # lsq-stream: reconstruct_target = "stream"; lsq-stream-reselect: reconstruct_reselect too
            mode, target, *rest = [*reconstruct.split("-"), ""]
            seqs, seq_len = (64, 256) if target else (8, 128)
            profile.write_text(PROFILE.format(reconstruct=mode, target=target or "layer", seqs=seqs,
                                              seq_len=seq_len, reselect=str("reselect" in rest).lower()))
            args = [str(model), "--profile", str(profile), "--sparsity", "0.1"]
        args += ["--memory", cap]
        est = subprocess.run([*CLI, "estimate", *args, "--json"], check=True, capture_output=True, text=True)
        e = json.loads(est.stdout)
        return ([*CLI, "-v", "prune", *args, "--out", str(out), "--calib", "wikitext2-valid", "--force"],
                e["memory"]["total_gb"], e["eta_hours"])
    if cmd == "eval":
        return [*CLI, "-v", "eval", str(model), "--data", "wikitext2-valid", "--seq-len", "128",
                "--max-seqs", "8", "--batch-seqs", "8", "--memory", cap], None, None
    if cmd.startswith("export-gguf"):  # f16, or export-gguf:TYPE (written beside, then removed)
        kind = cmd.partition(":")[2] or "f16"
        dest = gguf if kind == "f16" else gguf.with_suffix(f".{kind}.gguf")
        return [*CLI, "-v", "export-gguf", str(model), "--out", str(dest), "--type", kind, "--force"], None, None
    if cmd == "import-gguf":
        return [*CLI, "-v", "import-gguf", str(gguf), "--out", str(out), "--force"], None, None
    raise ValueError(cmd)


def measure(memcap: str, cap: str, args: list[str], scratch: Path) -> tuple[dict, str]:
    figures = scratch / "memcap.json"
    figures.unlink(missing_ok=True)
    proc = subprocess.run(["nice", "-n", "5", memcap, "--json", str(figures), cap, "--", *args],
                          capture_output=True, text=True, cwd=ROOT)
    if not figures.is_file():
        raise SystemExit(f"memcap wrote no figures:\n{proc.stderr[-2000:]}")
    return json.loads(figures.read_text()), proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memcap", required=True, help="path of the memcap program")
    ap.add_argument("--scratch", type=Path, required=True, help="folder for checkpoints and outputs")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--resume", action="store_true", help="keep the runs in --json that succeeded")
    ap.add_argument("--only", help="run only the models whose name contains this")
    ap.add_argument("--smollm2", type=lambda p: Path(p).resolve(), help="an imported SmolLM2-135M folder: also measure it "
                    "(without it, its runs are left out)")
    a = ap.parse_args()
    given = {"smollm2-135m": a.smollm2} if a.smollm2 else {}
    if not a.smollm2:
        print("no --smollm2 folder: the shipped profile's run on SmolLM2 is left out", flush=True)
    gib = 1024**3
    results = json.loads(a.json.read_text())["runs"] if a.resume and a.json.is_file() else []
    done = {(r["model"], r["command"], r["cap"], r["reconstruct"] or "") for r in results if r["exit"] == 0}
    results = [r for r in results if r["exit"] == 0]
    for name, cmd, cap, reconstruct in RUNS:
        if (a.only and a.only not in name) or (name, cmd, cap, reconstruct) in done:
            continue
        model = make(name, a.scratch, given)
        if model is None:
            continue
        args, planned, eta = command(model, cmd, cap, reconstruct, a.scratch)
        t0 = time.time()
        fig, err = measure(a.memcap, cap, args, a.scratch)
        if planned is None:
            found = PLAN_LINE.findall(err)
            planned = float(found[-1]) if found else None
        peak = fig["peak_anon"] / gib
        row = {
            "model": name, "shape": MODELS.get(name, (name,))[0], "layers": json.loads((model / "config.json").read_text())[
                "num_hidden_layers"], "command": cmd, "cap": cap, "reconstruct": reconstruct or None,
            "planned_gib": planned, "peak_anon_gib": round(peak, 3),
            "peak_charged_gib": round(fig["peak_charged"] / gib, 3), "exit": fig["exit"],
            "oom_kills": fig["oom_kills"], "wall_s": round(time.time() - t0, 1),
            "within_plan": planned is not None and peak < planned and fig["exit"] == 0,
            **({"eta_hours": eta} if cmd == "prune" else {}),
            "argv": " ".join(["memcap", cap, "--", "lowmem-bonsai", *args[3:]]).replace(str(a.scratch), "SCRATCH"),
        }
        if fig["exit"] != 0:
            row["stderr_tail"] = err[-1500:]
        report = Path(args[args.index("--out") + 1]) / "report.json" if "--out" in args else None
        if cmd == "prune" and report is not None and report.is_file():  # the dtypes the run chose
            rep = json.loads(report.read_text())
            row["compute_dtype"] = rep.get("compute_dtype")
            row["repair_dtype"] = (rep.get("reconstruction") or {}).get("dtype")
        results.append(row)
        print(f"{name:16s} {cmd:12s} cap {cap:>4s} {reconstruct:5s} planned {planned} GiB, peak "
              f"{peak:.2f} GiB, exit {fig['exit']}, {row['wall_s']} s", flush=True)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"runs": results}, indent=1))
        out = Path(args[args.index("--out") + 1]) if "--out" in args else None
        if cmd in ("prune", "import-gguf"):
            shutil.rmtree(out, ignore_errors=True)  # disk is shared: keep only what the next run reads
        elif cmd.startswith("export-gguf:"):
            out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
