"""Block streamer: blocks come off disk in order, the next ones loading while the current computes.

At most ``prefetch + 1`` blocks are resident: the one being used and the ones being loaded. A block
is released (its tensors dropped) as soon as the consumer asks for the next one.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..model.checkpoint import Checkpoint
from ..model.plan import Plan
from .block import BlockWeights, load_block

log = logging.getLogger(__name__)


def _nothing() -> None:
    """The first task of a streamer's pool: it starts the loader thread (see ``__iter__``)."""


class BlockStreamer:
    """Iterate over a checkpoint's blocks, sliced to ``plan``, with background prefetch."""

    def __init__(self, ckpt: Checkpoint, *, plan: Plan | None, dtype: torch.dtype,
                 prefetch: int = 1, device: torch.device | None = None) -> None:
        if prefetch < 0:
            raise ValueError("prefetch must be >= 0")
        self.ckpt, self.plan, self.dtype, self.prefetch = ckpt, plan, dtype, prefetch
        # Blocks are read and sliced on the host; on a GPU each is copied over just before it
        # computes, on the consumer's stream (so the copy is ordered with the kernels using it).
        self.device = device if device is not None else torch.device("cpu")
        self.resident = 0  # blocks loaded (or loading) and not yet released
        self.max_resident = 0

    def _load(self, layer: int) -> BlockWeights:
        keep = self.plan.layers[layer] if self.plan is not None else None
        return load_block(self.ckpt, layer, keep, dtype=self.dtype)

    def _submit(self, pool: ThreadPoolExecutor, layer: int) -> Future:
        self.resident += 1
        self.max_resident = max(self.max_resident, self.resident)
        return pool.submit(self._load, layer)

    def __iter__(self) -> Iterator[BlockWeights]:
        n = self.ckpt.config.num_hidden_layers
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-loader") as pool:
            # Start the pool's thread before any block is queued. The pool registers a thread (so that
            # its shutdown joins it) only once the thread has started, and the interpreter's exit
            # waits only for threads already running: a Ctrl-C landing in between leaves a thread that
            # may first run while the interpreter finalizes, so it must have nothing to load. One left
            # loading a block was in torch then, and the process aborted ("terminate called without an
            # active exception") instead of exiting 130.
            pool.submit(_nothing)
            queue: deque[Future] = deque()
            next_layer = 0
            try:
                for _ in range(n):
                    while next_layer < n and len(queue) <= self.prefetch:
                        queue.append(self._submit(pool, next_layer))
                        next_layer += 1
                    block = queue.popleft().result().to(self.device)
                    yield block
                    del block  # release: the consumer holds no reference past its loop body
                    self.resident -= 1
                    log.debug("released block %d", next_layer - len(queue) - 1)
            finally:
                for fut in queue:
                    fut.cancel()
