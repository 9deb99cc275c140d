"""Reconstruction between the rounds (profile key ``reconstruct_in_rounds``).

Before every round after the first, the plan entering it is repaired with the profile's
reconstruction, refit from the source's weights as the final repair is, and the round streams the
source with those tensors laid over it: its prior, masks and selection see the repaired model.
The final repair is unchanged (from the source, for the final plan): the key changes only which
units are chosen.

Rank 0 keeps the repair of the last finished round N in ``OUT.partial/repair-round-N/``, finished by
a ``done.json`` naming the plan it repairs. A resumed single process reuses a finished folder and
redoes an unfinished one. The other ranks of a distributed prune write their copy into a temporary
folder of their own, which a restarted job cannot find, so there the ranks redo the repair together.
Every rank solves the same system from the same summed moments; each then compares its files with
rank 0's and takes rank 0's bytes where they differ, so every rank scores the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from ..engine.ranks import SINGLE, Ranks
from ..model.checkpoint import Checkpoint
from ..model.plan import Plan
from ..outputs.atomic import write_bytes_atomic, write_json_atomic
from ..profiles import Profile
from .prune import Progress, Repaired
from .reconstruct import passes, reconstruct, settings_of

log = logging.getLogger(__name__)

DONE = "done.json"  # written last: the folder is complete


def folder_of(work: Path, finished: int) -> Path:
    """Where rank 0 keeps the repair of round ``finished``'s plan."""
    return Path(work) / f"repair-round-{finished}"


class RoundRepairs:
    """``repair(round, plan)`` for :func:`~.prune.run_rounds`: the source with the repair of ``plan``
    (the plan entering ``round``) laid over it. :meth:`close` removes the folders."""

    def __init__(self, source: Checkpoint, tokens: torch.Tensor, *, work: Path, profile: Profile,
                 ranks: Ranks = SINGLE, progress: Progress | None = None) -> None:
        self.source, self.tokens, self.work = source, tokens, Path(work)  # tokens: (S, T) the repair's
        self.profile, self.ranks, self.progress = profile, ranks, progress
        self._scratch: Path | None = None  # a rank other than 0: its temporary folder

    def __call__(self, number: int, plan: Plan) -> Repaired:
        finished = number - 1
        per_token = passes(self.profile.reconstruct_target, self.profile.reconstruct_sequential)
        cost = per_token * self.tokens.numel()  # as the final repair's report
        if self.ranks.world == 1:
            folder = folder_of(self.work, finished)
            files = self._finished(folder, plan)
            if files is not None:
                log.info("round %d scores the repair of round %d's plan made before the restart (%s)",
                         number, finished, folder)
                return Repaired(self.source.with_overlay(files), cost, 0)
        self.close()  # earlier rounds' repairs, or an unfinished one
        folder = (folder_of(self.work, finished) if self.ranks.main
                  else Path(tempfile.mkdtemp(prefix=f"lowmem-bonsai-rank{self.ranks.rank}-repair-")))
        if not self.ranks.main:
            self._scratch = folder
        n_layers = self.source.config.num_hidden_layers
        on_block = (lambda l: self.progress("repair", l + 1, n_layers)) if self.progress else None
        log.info("round %d: repairing round %d's plan (%s) into %s", number, finished,
                 self.profile.reconstruct, folder)
        # never reselect here: the rounds go on from the plan the method chose (and resume by it);
        # reconstruct_reselect is the final repair's
        settings = {**settings_of(self.profile), "reselect": False}
        rep = reconstruct(self.source, plan, self.tokens, folder, **settings,
                          on_block=on_block, ranks=self.ranks, write=True)
        same_files(rep.files, self.ranks, what=f"the repair before round {number}")
        if self.ranks.main:
            write_json_atomic(folder / DONE, {"round": finished, "layers": plan.to_json()["layers"],
                                              "files": [p.name for p in rep.files]})
        computed = per_token * len(self.ranks.share(self.tokens.shape[0])) * self.tokens.shape[1]
        return Repaired(self.source.with_overlay(rep.files), cost, computed)

    def _finished(self, folder: Path, plan: Plan) -> list[Path] | None:
        """The files of a complete repair of ``plan`` in ``folder``, or None."""
        try:
            done = json.loads((folder / DONE).read_text(encoding="utf-8"))
            files = [folder / name for name in done["files"]]
            ok = done["layers"] == plan.to_json()["layers"] and all(p.is_file() for p in files)
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None
        return files if ok else None

    def close(self) -> None:
        """Remove the repairs made so far (rank 0's folders, another rank's temporary one)."""
        if self.ranks.main:
            for old in self.work.glob("repair-round-*"):
                shutil.rmtree(old, ignore_errors=True)
        elif self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def same_files(files: list[Path], ranks: Ranks, *, what: str) -> None:
    """Rank 0's bytes in every rank's copy of ``files`` (each rank's own folder, the same names):
    the ranks solved the same system, so they agree already; this makes it certain."""
    if ranks.world == 1:
        return
    mine = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    every = ranks.gather(mine, what=what)
    differ = sorted(name for name in every[0] if any(d.get(name) != every[0][name] for d in every))
    by_name = {p.name: p for p in files}
    for name in differ:
        data = ranks.broadcast(by_name[name].read_bytes() if ranks.main else None, what=what)
        if not ranks.main:
            write_bytes_atomic(by_name[name], data)
    if differ:
        log.info("rank %d: took rank 0's bytes for %d of %d repaired files", ranks.rank, len(differ), len(files))
