"""One prune over several processes: the ranks of a torch.distributed job, as torchrun starts them.

torchrun (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``)
starts the same command once per rank. :func:`join` finds them in the environment and joins the
process group: gloo for the host-side exchanges (losses, column statistics, the plan), with NCCL
beside it when the blocks compute on CUDA. Without those variables the run is one rank and every
exchange is the identity, so the round loop has one code path.

Every rank beats in the rendezvous store (a counter a thread of its own raises every half second).
When an exchange fails (a peer's connection closed, or nothing came for ``timeout_s``), the ranks
whose counter no longer moves are the ones that died or hung: the error names them. A rank that is
merely slower still beats, and is not blamed.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")
_BEAT = "lowmem_bonsai/beat/{}"
BEAT_S = 0.5  # seconds between a rank's beats


class RankLost(UserError):
    """Another rank of the job died, hung or lost its connection (exit status 3)."""

    exit_code = 3


@dataclass(frozen=True, slots=True)
class Ranks:
    """This process's place in the job and the exchanges between its ranks."""

    rank: int = 0
    world: int = 1
    timeout_s: float = 0.0
    store: Any = field(default=None, repr=False, compare=False)  # a client of the rendezvous store
    _seq: Any = field(default_factory=itertools.count, repr=False, compare=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

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
            run()
        except (RuntimeError, ValueError, OSError) as exc:  # gloo's errors are RuntimeErrors
            log.debug("exchange %d (%s) failed: %s", seq, what, exc)
            raise RankLost(self._who_stopped(what)) from None

    def _beats(self) -> dict[int, int]:
        return {r: int(self.store.add(_BEAT.format(r), 0)) for r in range(self.world) if r != self.rank}

    def _who_stopped(self, what: str) -> str:
        try:
            before = self._beats()
            time.sleep(4 * BEAT_S)
            after = self._beats()
        except (RuntimeError, ValueError, OSError):
            return (f"rank {self.rank}: the job's rendezvous store stopped answering during {what} (rank 0 "
                    "or the launcher is gone)")
        silent = [r for r in before if after[r] == before[r]]
        who = (f"rank {silent[0]}" if len(silent) == 1 else f"ranks {', '.join(map(str, silent))}"
               if silent else "another rank")
        return (f"rank {self.rank}: {who} stopped answering during {what} (died, hung or lost its "
                f"connection; waited at most {self.timeout_s:g} s)")

    def beat(self, store: Any) -> None:
        """Raise this rank's counter in ``store`` every BEAT_S seconds until :meth:`close`."""
        key = _BEAT.format(self.rank)
        while not self._stop.wait(BEAT_S):
            try:
                store.add(key, 1)
            except (RuntimeError, ValueError, OSError):
                return  # the store is gone: the next exchange says so

    def close(self) -> None:
        self._stop.set()
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
    # Plain clients of the rendezvous store (the one torchrun's agent or rank 0 serves at
    # MASTER_ADDR:MASTER_PORT), one per thread: the beats never wait behind the process group.
    def client() -> Any:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timeout)
    ranks = Ranks(rank, world, timeout_s, client())
    threading.Thread(target=ranks.beat, args=(client(),), name="lowmem-bonsai-beat", daemon=True).start()
    return ranks
