"""Crash-safe progress of a prune: checkpointed after every wave of masks and every round.

The state is one JSON file, rewritten atomically (temporary name, fsync, rename). It holds the plan
and reports of the finished rounds, the random generator's state at the start of the current round
and the losses of the waves already scored in it. A resumed run restores the generator, redoes the
(deterministic) prior pass, redraws the same masks, skips the scored waves, and so ends with exactly
the plan an uninterrupted run produces.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError, WriteError
from ..model.config import ModelConfig
from ..model.plan import Plan
from .atomic import write_json_atomic

log = logging.getLogger(__name__)

STATE_VERSION = 1


def _is_generator_state(text: Any) -> bool:
    try:
        torch.Generator().set_state(_gen_from_str(text))
    except (TypeError, ValueError, RuntimeError, binascii.Error):
        return False
    return True


def _damage(data: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a saved progress (a state.json edited by hand), or None."""
    def number(v: Any) -> bool:  # NaN included: a round's cv_tau is NaN when it cannot be computed
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    from ..method.prune import RoundReport  # prune imports this module

    fields = {f.name for f in dataclasses.fields(RoundReport)}
    rounds, start, waves = data.get("rounds"), data.get("round_start"), data.get("waves")
    if not isinstance(rounds, list) or not all(
            isinstance(r, dict) and set(r) <= fields and all(v is None or number(v) for v in r.values())
            and all(isinstance(r.get(k), int) for k in ("round", "params_before", "params_after"))
            for r in rounds):
        return "'rounds' must be a list of round reports"
    if data.get("plan") is not None and not isinstance(data["plan"], dict):
        return "'plan' must be an object or null"
    if bool(rounds) != (data.get("plan") is not None):
        return "'plan' and 'rounds' disagree"
    if start is not None and not (isinstance(start, dict) and isinstance(start.get("round"), int)
                                  and not isinstance(start.get("round"), bool)
                                  and _is_generator_state(start.get("gen"))):
        return "'round_start' must be null or a round number with a generator state"
    if not isinstance(waves, dict) or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, list) and v and all(map(number, v))
            for k, v in waves.items()):
        return "'waves' must map wave numbers to lists of losses"
    if waves and start is None:
        return "'waves' were scored outside a round"
    if data.get("gen_after") is not None and not _is_generator_state(data["gen_after"]):
        return "'gen_after' is not a generator state"
    return None


def _gen_to_str(gen: torch.Generator) -> str:
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode()


def _gen_from_str(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


class RunState:
    """Progress of one prune, kept in ``path`` (a JSON file in the run's work folder)."""

    def __init__(self, path: Path | None, *, key: dict[str, Any]) -> None:
        self.path = Path(path) if path is not None else None  # None: a mirror, never written
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
    def load(cls, path: Path, *, key: dict[str, Any], config: ModelConfig | None = None) -> RunState:
        """The saved progress at ``path``, checked against ``key`` and (its plan) ``config``."""
        state = cls(path, key=key)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise UserError(f"{path}: cannot read the saved progress ({exc}); start over with --force") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: the saved progress is damaged (not a JSON object); start over "
                            "with --force")
        if data.get("version") != STATE_VERSION or data.get("key") != key:
            raise UserError(
                f"{path}: the saved progress belongs to a run with other settings or another model; "
                "resume with the same command, or start over with --force"
            )
        problem = _damage(data)
        if problem is None and data["plan"] is not None and config is not None:
            try:
                Plan.from_json(data["plan"], source="its plan").validate(config)
            except UserError as exc:
                problem = str(exc)
        if problem is not None:
            raise UserError(f"{path}: the saved progress is damaged ({problem}); start over with "
                            "--force")
        state.data = data
        return state

    @classmethod
    def mirror(cls, data: dict[str, Any], *, key: dict[str, Any]) -> RunState:
        """Another rank's copy of rank 0's progress: it follows the same steps and writes nothing."""
        state = cls(None, key=key)
        state.data = data
        return state

    def _save(self) -> None:
        if self.path is not None:
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


# --- one prune per output ---------------------------------------------------------------------

def _lock_owner(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(owner, dict) and isinstance(owner.get("pid"), int) and isinstance(owner.get("host"), str)
    return owner if ok else None


def _is_running(owner: dict[str, Any] | None, path: Path) -> bool:
    """Whether the prune that wrote the lock may still run (a lock being written counts as one)."""
    if owner is None:
        try:
            return time.time() - path.stat().st_mtime < 10  # just created, not yet written
        except OSError:
            return False
    if owner["host"] != socket.gethostname():
        return True  # another machine's process cannot be looked at
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return owner["pid"] > 0
    return True


@contextlib.contextmanager
def run_lock(path: Path, *, out: Path) -> Iterator[None]:
    """Hold ``path`` while a prune into ``out`` runs; it names the process (pid, host, start).

    A second prune into the same ``out`` is refused with that name; a lock whose process is gone
    (killed, machine restarted) is taken over.
    """
    path = Path(path)
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _lock_owner(path)
            if _is_running(owner, path):
                who = (f"pid {owner['pid']} on {owner['host']}, started {owner.get('started', '?')}"
                       if owner else "its owner is writing it")
                raise UserError(f"{path}: another prune into {out} is running ({who}); wait for it "
                                "to finish, or stop it; remove this file only if no such process "
                                "runs") from None
            log.warning("%s: taking over the lock of a prune that no longer runs (%s)", path, owner)
            path.unlink(missing_ok=True)
            continue
        except OSError as exc:
            raise WriteError(path, exc) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    else:
        raise UserError(f"{path}: could not take the lock; remove it if no prune into {out} runs")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
