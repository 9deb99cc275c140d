"""report.json and the PNG figure written next to every pruned model."""

from __future__ import annotations

import io
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..method.prune import PruneResult
from ..model.config import ModelConfig
from ..model.plan import Plan
from .atomic import write_bytes_atomic

log = logging.getLogger(__name__)


def build_report(source: ModelConfig, result: PruneResult, *, settings: dict[str, Any],
                 seconds: float) -> dict[str, Any]:
    before = source.non_embedding_params()
    after = source.with_layers(result.plan.shapes()).non_embedding_params()
    return {
        "params_before": before,
        "params_after": after,
        "target_sparsity": settings["sparsity"],
        "achieved_sparsity": 1 - after / before,
        "forward_tokens": sum(r.forward_tokens for r in result.rounds),
        "seconds": seconds,
        "settings": settings,
        "layers": [
            {"heads": len(lp.heads), "kv_heads": len(lp.kv_heads), "channels": len(lp.channels)}
            for lp in result.plan.layers
        ],
        "rounds": [asdict(r) for r in result.rounds],
    }


def plot(source: ModelConfig, plan: Plan, report: dict[str, Any], path: Path) -> bool:
    """Per-layer kept widths and calibration loss by round; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log.warning("matplotlib is not installed: no figure (pip install matplotlib)")
        return False
    layers = range(len(plan.layers))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    heads = [len(lp.heads) / s.num_attention_heads for lp, s in zip(plan.layers, source.layers)]
    chans = [len(lp.channels) / s.intermediate_size for lp, s in zip(plan.layers, source.layers)]
    ax1.bar([i - 0.2 for i in layers], heads, width=0.4, label="attention heads kept")
    ax1.bar([i + 0.2 for i in layers], chans, width=0.4, label="MLP channels kept")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("fraction of original width")
    ax1.set_ylim(0, 1.05)
    ax1.legend(loc="lower right")
    ax1.set_title(f"kept widths ({report['achieved_sparsity']:.1%} of block params removed)")
    rounds = report["rounds"]
    ax2.plot([r["round"] for r in rounds], [r["calib_loss"] for r in rounds], "o-",
             label="model entering the round")
    if any(r["mask_loss_mean"] is not None for r in rounds):
        ax2.plot([r["round"] for r in rounds], [r["mask_loss_mean"] for r in rounds], "s--",
                 label="sampled sub-models (mean)")
    ax2.set_xlabel("round")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are 1, 2, ..., never 1.2
    ax2.set_ylabel("calibration NLL (nats/token)")
    ax2.legend()
    ax2.set_title(f"method {report['settings']['method']}")
    fig.tight_layout()
    png = io.BytesIO()  # rendered in memory, so a full disk fails in write_bytes_atomic, cleanly
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, png.getvalue())
    return True
