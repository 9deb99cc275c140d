"""One prune over several processes: the ranks of a torch.distributed job, as torchrun starts them.

torchrun (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``)
starts the same command once per rank. :func:`join` finds them in the environment and joins the
process group: gloo for the host-side exchanges (losses, column statistics, the plan), with NCCL
beside it when the blocks compute on CUDA. Without those variables the run is one rank and every
exchange is the identity, so the round loop has one code path.

Every exchange goes through :meth:`Ranks._exchange`, which first records in the rendezvous store how
far this rank got. When an exchange fails (a peer's connection closed, or nothing came for
``timeout_s``), the store tells which ranks never reached it: the error names them.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")
_KEY = "lowmem_bonsai/reached/{}"


class RankLost(UserError):
    """Another rank of the job died, hung or lost its connection (exit status 3)."""

    exit_code = 3


@dataclass(frozen=True, slots=True)
class Ranks:
    """This process's place in the job and the exchanges between its ranks."""

    rank: int = 0
    world: int = 1
    timeout_s: float = 0.0
    store: Any = field(default=None, repr=False, compare=False)
    _seq: Any = field(default_factory=itertools.count, repr=False, compare=False)

    @property
    def main(self) -> bool:
        """Rank 0: the one that reads and writes the output folder."""
        return self.rank == 0

    def share(self, n: int) -> range:
        """This rank's contiguous part of ``n`` items (earlier ranks take one more when uneven)."""
        base, extra = divmod(n, self.world)
        a = self.rank * base + min(self.rank, extra)
        return range(a, a + base + (self.rank < extra))

    # --- exchanges -------------------------------------------------------------------------------
    def gather(self, obj: T, *, what: str) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        self._exchange(what, lambda: dist.all_gather_object(out, obj))
        return out

    def sum(self, t: torch.Tensor, *, what: str) -> torch.Tensor:
        """The elementwise sum of every rank's ``t`` (a host tensor; fp64 keeps the order's effect
        on the result near the last bit)."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        buf = t.double().clone()
        self._exchange(what, lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM))
        return buf

    def broadcast(self, obj: T, *, what: str) -> T:
        """Rank 0's ``obj``, on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        self._exchange(what, lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def _exchange(self, what: str, run: Callable[[], Any]) -> None:
        seq = next(self._seq)
        try:
            self.store.set(_KEY.format(self.rank), str(seq))
            run()
        except (RuntimeError, ValueError, OSError) as exc:  # gloo's errors are RuntimeErrors
            raise RankLost(self._who_stopped(seq, what, exc)) from None

    def _who_stopped(self, seq: int, what: str, exc: BaseException) -> str:
        log.debug("exchange %d (%s) failed: %s", seq, what, exc)
        behind = []
        try:
            for r in range(self.world):
                key = _KEY.format(r)
                if r != self.rank and (not self.store.check([key]) or int(self.store.get(key)) < seq):
                    behind.append(r)
        except (RuntimeError, ValueError, OSError):
            return (f"rank {self.rank}: the job's rendezvous store stopped answering during {what} (rank 0 "
                    "or the launcher is gone)")
        who = (f"rank {behind[0]}" if len(behind) == 1 else f"ranks {', '.join(map(str, behind))}"
               if behind else "another rank")
        return (f"rank {self.rank}: {who} stopped answering during {what} (died, hung or lost its "
                f"connection; waited at most {self.timeout_s:g} s)")

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = Ranks()


def launched() -> bool:
    """Whether a launcher started this process as one rank of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def join(*, timeout_s: float, device: str) -> Ranks:
    """This process's ranks: one (no launcher), or the job torchrun started, joined now."""
    if not launched():
        return SINGLE
    import torch.distributed as dist

    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]  # noqa: B018 (both must be set)
    except (KeyError, ValueError) as exc:
        raise UserError(f"WORLD_SIZE is {os.environ.get('WORLD_SIZE')} but {exc} is missing or not a "
                        "number: start a distributed prune with torchrun") from None
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank,
                                world_size=world, timeout=timeout)
    except (RuntimeError, ValueError, OSError) as exc:
        raise RankLost(f"rank {rank}: could not join the {world} ranks at "
                       f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_s:g} s "
                       f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    log.info("rank %d of %d joined (timeout %g s)", rank, world, timeout_s)
    return Ranks(rank, world, timeout_s, store)
