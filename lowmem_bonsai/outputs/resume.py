"""Crash-safe progress of a prune: checkpointed after every wave of masks and every round.

The state is one JSON file, rewritten atomically (temporary name, fsync, rename). It holds the plan
and reports of the finished rounds, the random generator's state at the start of the current round
and the losses of the waves already scored in it. A resumed run restores the generator, redoes the
(deterministic) prior pass, redraws the same masks, skips the scored waves, and so ends with exactly
the plan an uninterrupted run produces.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..model.plan import Plan
from .atomic import write_json_atomic

log = logging.getLogger(__name__)

STATE_VERSION = 1


def _gen_to_str(gen: torch.Generator) -> str:
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode()


def _gen_from_str(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


class RunState:
    """Progress of one prune, kept in ``path`` (a JSON file in the run's work folder)."""

    def __init__(self, path: Path, *, key: dict[str, Any]) -> None:
        self.path = Path(path)
        self.key = key  # what must match for a resume to be valid (source, settings)
        self.data: dict[str, Any] = {"version": STATE_VERSION, "key": key, "rounds": [], "plan": None,
                                     "round_start": None, "waves": {}}

    @classmethod
    def create(cls, path: Path, *, key: dict[str, Any]) -> RunState:
        """A new run's state, written at once (a run with no state file has no progress)."""
        state = cls(path, key=key)
        state._save()
        return state

    @classmethod
    def load(cls, path: Path, *, key: dict[str, Any]) -> RunState:
        state = cls(path, key=key)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: cannot read the saved progress ({exc}); start over with --force") from None
        if data.get("version") != STATE_VERSION or data.get("key") != key:
            raise UserError(
                f"{path}: the saved progress belongs to a run with other settings or another model; "
                "resume with the same command, or start over with --force"
            )
        state.data = data
        return state

    def _save(self) -> None:
        write_json_atomic(self.path, self.data)

    # --- rounds -------------------------------------------------------------------------------
    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.data["rounds"]

    @property
    def has_progress(self) -> bool:
        """Whether any round or wave has been scored (else a rerun loses nothing)."""
        return bool(self.data["rounds"] or self.data["waves"])

    def plan(self) -> Plan | None:
        return Plan.from_json(self.data["plan"], source=str(self.path)) if self.data["plan"] else None

    def begin_round(self, number: int, gen: torch.Generator) -> None:
        """Called at a round's start: remember the generator (or restore it when resuming)."""
        start = self.data["round_start"]
        if start is not None and start["round"] == number:
            gen.set_state(_gen_from_str(start["gen"]))
            log.info("resuming round %d with %d waves already scored", number, len(self.data["waves"]))
            return
        self.data["round_start"] = {"round": number, "gen": _gen_to_str(gen)}
        self.data["waves"] = {}
        self._save()

    def end_round(self, plan: Plan, report: Any, gen: torch.Generator) -> None:
        self.data["rounds"].append(asdict(report))
        self.data["plan"] = plan.to_json()
        self.data["round_start"] = None
        self.data["waves"] = {}
        self.data["gen_after"] = _gen_to_str(gen)
        self._save()

    def restore_generator(self, gen: torch.Generator) -> None:
        if self.data.get("gen_after"):
            gen.set_state(_gen_from_str(self.data["gen_after"]))

    # --- waves ----------------------------------------------------------------------------------
    def wave_loss(self, index: int) -> torch.Tensor | None:
        losses = self.data["waves"].get(str(index))
        return torch.tensor(losses, dtype=torch.float64) if losses is not None else None

    def save_wave(self, index: int, loss: torch.Tensor) -> None:
        self.data["waves"][str(index)] = [float(v) for v in loss.double()]
        self._save()
