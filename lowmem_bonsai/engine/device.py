"""Where the masked forward computes: the CPU (default) or one CUDA GPU.

On a GPU the executor keeps the hidden-state store, one resident block and the lm_head chunk in
device memory; blocks are still read and sliced on the host by the loader thread (so the host holds
``prefetch`` blocks ahead) and copied to the device just before they compute.
"""

from __future__ import annotations

import torch

from ..errors import UserError


def resolve_device(name: str) -> torch.device:
    """The profile's ``device`` as a torch.device, refused with a reason when it cannot run here."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"device '{name}' is not a device name (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise UserError(f"device '{name}': only cpu and cuda are supported")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserError(f"device '{name}' was asked for, but torch ({torch.__version__}, {build}) sees no "
                        "CUDA GPU here; use a CPU profile (for example laptop-16gb) or install a CUDA "
                        "build of torch on a machine with a GPU")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise UserError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device("cuda", index)


def free_bytes(dev: torch.device) -> int | None:
    """Free memory of a CUDA device (None for the CPU)."""
    if dev.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free)


def synchronize(dev: torch.device) -> None:
    """Wait for queued kernels (timing on a GPU measures nothing without it)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
