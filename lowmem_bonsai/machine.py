"""What memory this machine, or the container it runs in, really has; the budget a run plans for.

A profile's ``memory_gb`` is what its kind of machine can spare. The machine a command runs on may
have less: other programs use some (``MemAvailable`` in ``/proc/meminfo``), and a container or a
systemd slice may cap the process by a cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``, on
the process's own cgroup or any above it). Planning past such a cap ends in the kernel's OOM killer,
hours in. So the budget is the smallest of the three unless ``--memory`` says otherwise, and every
command that plans says which one it took and why.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import UserError

log = logging.getLogger(__name__)

GIB = 1024**3
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_UNLIMITED = 2**60  # v1 writes 9223372036854771712 (page-rounded 2^63-1) for "no limit"; v2 writes "max"
# The planner counts anonymous memory; the cgroup also charges the page cache of the memory-mapped
# shards. Clean cache is reclaimed under the cap, but planning to the last byte leaves no room for it.
MACHINE_SHARE = 0.95


def parse_memory(text: str, *, flag: str = "--memory") -> int:
    """Bytes from '6G', '6GB', '6GiB', '6144M', '6.5G', '512m' (binary units: G = 2^30 bytes)."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?", text.strip().upper())
    if not m:
        raise UserError(f"{flag} {text!r}: not a memory size; expected e.g. 6G, 6GB, 6144M or 6.5G")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size < 64 * 2**20:
        raise UserError(f"{flag} {text!r}: {size} bytes is too little to run anything; "
                        "expected at least 64M (a unit: K, M, G or T)")
    return size


@dataclass(frozen=True, slots=True)
class MachineMemory:
    """What the kernel says this process may have, in bytes (None where it says nothing)."""

    available_bytes: int | None  # MemAvailable: free memory plus what the kernel can reclaim
    cgroup_limit_bytes: int | None  # the lowest memory limit on this process's cgroup or its parents
    cgroup_file: str | None  # the file that sets it


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value < _UNLIMITED else None


def _meminfo_available(root: Path) -> int | None:
    try:
        lines = (root / "proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, rest = line.partition(":")
        if key == "MemAvailable":
            parts = rest.split()
            if parts and parts[0].isdigit():
                return int(parts[0]) * 1024  # the kernel writes kB (KiB)
    return None


def _cgroup_limit_files(root: Path) -> list[Path]:
    """Every memory-limit file that applies to this process: its cgroup's and each parent's.

    In a container with its own cgroup namespace the path in /proc/self/cgroup is "/" and the
    mount's top folder is the container's cgroup, so the top folder is always looked at too.
    """
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    files = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "" and parts[0] == "0":  # v2: "0::/path"
            base = root / "sys/fs/cgroup"
            if not (base / "cgroup.controllers").exists() and (base / "unified").is_dir():
                base = base / "unified"  # hybrid layout
            name = "memory.max"
        elif "memory" in controllers.split(","):  # v1: "N:memory:/path"
            base, name = root / "sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        rel = PurePosixPath(path)
        chain = [rel, *rel.parents] if rel.is_absolute() else [PurePosixPath("/")]
        files += [base / str(p).lstrip("/") / name for p in chain]
    return files


def read_machine_memory(*, root: Path = Path("/")) -> MachineMemory:
    """MemAvailable and the lowest cgroup memory limit of this process (``root``: for tests)."""
    root = Path(root)
    limit, where = None, None
    for path in _cgroup_limit_files(root):
        value = _read_int(path)
        if value is not None and (limit is None or value < limit):
            limit, where = value, path
    return MachineMemory(available_bytes=_meminfo_available(root), cgroup_limit_bytes=limit,
                         cgroup_file=None if where is None else str(where))


@dataclass(frozen=True, slots=True)
class Budget:
    gb: float  # GiB, the unit of a profile's memory_gb
    source: str  # flag | profile | cgroup | available
    reason: str  # one sentence: which budget and why

    def line(self) -> str:
        return f"memory budget {self.gb:.1f} GiB: {self.reason}"


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def memory_budget(*, profile_gb: float | None, profile_name: str = "", memory: str | None = None,
                  machine: MachineMemory | None = None) -> Budget:
    """The budget a run plans for: ``memory`` (the flag) if given, else the smallest of the
    profile's (``profile_gb``; None for commands without a profile) and MACHINE_SHARE of what the
    machine has (``machine``, read here when None)."""
    machine = read_machine_memory() if machine is None else machine
    have = []
    if machine.cgroup_limit_bytes is not None:
        have.append((machine.cgroup_limit_bytes, "cgroup",
                     f"the cgroup limit {_gib(machine.cgroup_limit_bytes)} ({machine.cgroup_file})"))
    if machine.available_bytes is not None:
        have.append((machine.available_bytes, "available",
                     f"the {_gib(machine.available_bytes)} available now (MemAvailable)"))
    least = min(have, key=lambda t: t[0]) if have else None
    if memory is not None:
        size = parse_memory(memory)
        if least is not None and size > least[0]:
            log.warning("--memory %s is more than this machine has (%s): the run may be killed for "
                        "memory", memory, least[2])
        return Budget(gb=size / GIB, source="flag", reason=f"--memory {memory}")
    theirs = f"the profile {profile_name}'s {profile_gb:g} GiB" if profile_gb is not None else None
    if least is None:
        if profile_gb is None:
            raise UserError("this machine does not say how much memory it has (no /proc/meminfo); "
                            "pass --memory, e.g. --memory 8G")
        return Budget(gb=profile_gb, source="profile",
                      reason=f"{theirs}; this machine does not say what it has")
    share = MACHINE_SHARE * least[0]
    if profile_gb is not None and profile_gb * GIB <= share:
        return Budget(gb=profile_gb, source="profile", reason=f"{theirs}, within {least[2]}")
    why = f"{MACHINE_SHARE:.0%} of {least[2]}"
    return Budget(gb=share / GIB, source=least[1],
                  reason=why + (f", which is below {theirs}" if theirs else ""))


# glibc's malloc serves a buffer below its mmap threshold from a heap and, once freed, keeps it
# resident unless it lies at the heap's top; the threshold itself rises (to 32 MB) each time a larger
# mapped buffer is freed. A streamed pass frees row-chunk buffers of a few MB by the thousand, so
# what a pass freed can stay resident into the next phase: SmolLM2 pruned with laptop-16gb held
# 0.67 GiB with 1 MB of live tensors when its repair began, and peaked at 1.25-1.34 GiB in three
# runs, above its plan's 1.21 (its rounds alone: 0.76-1.17 from run to run). Making every buffer of
# 1 MiB or more its own mapping (mallopt M_MMAP_THRESHOLD) gave 0.73-0.77 GiB, at the price of a
# fresh mapping, zeroed page by page, for every such buffer (one round took 357 s against 228 s, on
# a machine not otherwise quiet); malloc_trim between a run's phases costs a few milliseconds a call.
@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up once; None where the C library is not glibc, or not Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and others
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Hand the pages of freed heap memory back to the system (glibc's malloc_trim), between a
    run's phases. False where the C library is not glibc, or not Linux: nothing done."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


# Instructions through which a CPU computes bf16 matmuls natively; their rounding may differ from
# other CPUs' kernels, so a prune whose rounds run in bf16 may choose other units there (likely, not
# shown: docs/quality-history.md, `laptop-16gb` repairing twice).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def host_info(*, root: Path = Path("/")) -> dict:
    """What a run's figures may depend on besides its settings, for its report: the CPU (its model
    name and the bf16 instructions among its flags, from /proc/cpuinfo where there is one), the
    cores, the threads torch uses, and torch's version."""
    import torch

    try:
        text = (root / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():  # one stanza per logical CPU: the first says it
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    return {"cpu": cpu, "bf16_instructions": [f for f in BF16_FLAGS if f in flags],
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
