"""The memory budget from the machine: /proc/meminfo and cgroup v1/v2 limits, read from a fake root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lowmem_bonsai.cli import app
from lowmem_bonsai.errors import UserError
from lowmem_bonsai.machine import (GIB, host_info, MachineMemory, memory_budget, parse_memory,
                                   read_machine_memory)

from .conftest import make_tiny


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def meminfo(kib: int) -> str:
    return f"MemTotal:       65536000 kB\nMemFree:         1000000 kB\nMemAvailable:   {kib} kB\n"


@pytest.mark.parametrize("text, size", [("6G", 6 * GIB), ("6GB", 6 * GIB), ("6gib", 6 * GIB),
                                        ("6144M", 6 * GIB), ("6.5G", int(6.5 * GIB)),
                                        (" 512m ", 512 * 2**20), ("1T", 2**40), ("3000000000", 3_000_000_000)])
def test_parse_memory_accepts_the_usual_forms(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "G", "6X", "-1G", "six gigabytes", "6 G B", "1e9", "10", "6G6"])
def test_parse_memory_refuses_bad_ones_in_one_line(text):
    with pytest.raises(UserError) as info:
        parse_memory(text)
    assert "\n" not in str(info.value) and "--memory" in str(info.value)


def test_cgroup_v2_limit_of_this_cgroup_or_a_parent(tmp_path):
    write(tmp_path, "proc/meminfo", meminfo(20 * 1024**2))  # 20 GiB available
    write(tmp_path, "proc/self/cgroup", "0::/user.slice/app.scope\n")
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "cpu memory\n")
    write(tmp_path, "sys/fs/cgroup/user.slice/app.scope/memory.max", "max\n")
    write(tmp_path, "sys/fs/cgroup/user.slice/memory.max", f"{3 * GIB}\n")
    m = read_machine_memory(root=tmp_path)
    assert m.available_bytes == 20 * GIB and m.cgroup_limit_bytes == 3 * GIB
    assert m.cgroup_file.endswith("user.slice/memory.max")
    b = memory_budget(profile_gb=14.0, profile_name="laptop-16gb", machine=m)
    assert b.source == "cgroup" and b.gb == pytest.approx(0.95 * 3)
    assert "cgroup limit 3.0 GiB" in b.line() and "below the profile laptop-16gb's 14 GiB" in b.line()


def test_cgroup_v1_limit_and_unlimited_values(tmp_path):
    write(tmp_path, "proc/meminfo", meminfo(8 * 1024**2))
    write(tmp_path, "proc/self/cgroup", "9:pids:/\n4:memory:/process_api/abc/memcap-12\n0::/\n")
    write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
    write(tmp_path, "sys/fs/cgroup/memory/process_api/abc/memcap-12/memory.limit_in_bytes", f"{2 * GIB}\n")
    m = read_machine_memory(root=tmp_path)
    assert m.cgroup_limit_bytes == 2 * GIB and m.available_bytes == 8 * GIB
    # the limit removed: v1's "no limit" is a huge number, not a limit
    (tmp_path / "sys/fs/cgroup/memory/process_api/abc/memcap-12/memory.limit_in_bytes").write_text(
        "9223372036854771712\n")
    m = read_machine_memory(root=tmp_path)
    assert m.cgroup_limit_bytes is None
    b = memory_budget(profile_gb=14.0, profile_name="laptop-16gb", machine=m)
    assert b.source == "available" and b.gb == pytest.approx(0.95 * 8) and "MemAvailable" in b.reason


def test_container_namespace_sees_its_limit_at_the_mount_top(tmp_path):
    write(tmp_path, "proc/meminfo", meminfo(30 * 1024**2))
    write(tmp_path, "proc/self/cgroup", "0::/\n")
    write(tmp_path, "sys/fs/cgroup/cgroup.controllers", "memory\n")
    write(tmp_path, "sys/fs/cgroup/memory.max", f"{6 * GIB}\n")
    assert read_machine_memory(root=tmp_path).cgroup_limit_bytes == 6 * GIB


def test_profile_flag_and_a_machine_that_says_nothing(tmp_path):
    m = read_machine_memory(root=tmp_path)  # an empty root: no /proc, no cgroups
    assert m == MachineMemory(None, None, None)
    b = memory_budget(profile_gb=14.0, profile_name="p", machine=m)
    assert b.source == "profile" and b.gb == 14.0
    with pytest.raises(UserError, match="pass --memory"):
        memory_budget(profile_gb=None, machine=m)
    roomy = MachineMemory(available_bytes=64 * GIB, cgroup_limit_bytes=None, cgroup_file=None)
    b = memory_budget(profile_gb=14.0, profile_name="p", machine=roomy)
    assert b.source == "profile" and b.gb == 14.0 and "within the 64.0 GiB available" in b.reason
    small = MachineMemory(available_bytes=2 * GIB, cgroup_limit_bytes=None, cgroup_file=None)
    b = memory_budget(profile_gb=14.0, profile_name="p", memory="6.5G", machine=small)
    assert b.source == "flag" and b.gb == 6.5 and b.line() == "memory budget 6.5 GiB: --memory 6.5G"


def test_commands_take_and_refuse_memory(tmp_path):
    make_tiny(tmp_path / "m", "llama-gqa-tied")
    runner = CliRunner()
    res = runner.invoke(app, ["estimate", str(tmp_path / "m"), "--memory", "3G", "--json"])
    assert res.exit_code == 0, res.output
    e = json.loads(res.output)
    assert e["memory"]["budget_gb"] == 3.0 and e["memory_budget"]["source"] == "flag"
    res = runner.invoke(app, ["estimate", str(tmp_path / "m")])
    assert res.exit_code == 0 and "budget     memory budget" in res.output, res.output
    for cmd in (["estimate", str(tmp_path / "m")],
                ["eval", str(tmp_path / "m"), "--data", "wikitext2-valid"],
                ["prune", str(tmp_path / "m"), "--out", str(tmp_path / "o")]):
        res = runner.invoke(app, [*cmd, "--memory", "lots"])
        assert res.exit_code == 2, res.output
        assert res.output.strip().splitlines()[-1].startswith("error: --memory 'lots'")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    # a budget too small for two blocks is refused before any work
    res = runner.invoke(app, ["estimate", str(tmp_path / "m"), "--memory", "64M"])
    assert res.exit_code == 2 and "too small" in res.output


def test_prune_plans_for_the_machine_and_says_so(tmp_path, monkeypatch, sample_text):
    from lowmem_bonsai import machine

    from .conftest import write_word_tokenizer

    make_tiny(tmp_path / "m", "llama-gqa-tied")
    write_word_tokenizer(tmp_path / "m", sample_text.read_text())
    args = ["prune", str(tmp_path / "m"), "--calib", str(sample_text), "--sparsity", "0.2", "--seq-len", "32",
            "--calib-seqs", "2", "--masks-per-round", "4", "--prune-frac", "0.2"]
    capped = MachineMemory(available_bytes=20 * GIB, cgroup_limit_bytes=GIB, cgroup_file="/x/memory.max")
    monkeypatch.setattr(machine, "read_machine_memory", lambda root=None: capped)
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == (
        "memory budget 0.9 GiB: 95% of the cgroup limit 1.0 GiB (/x/memory.max), which is below the "
        "profile laptop-16gb's 14 GiB")
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    assert plan["settings"]["profile"]["memory_gb"] == pytest.approx(0.95)
    # a machine too small: refused in one line that says where the budget came from
    tiny = MachineMemory(available_bytes=200 * 2**20, cgroup_limit_bytes=None, cgroup_file=None)
    monkeypatch.setattr(machine, "read_machine_memory", lambda root=None: tiny)
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "p")])
    assert res.exit_code == 2
    (line,) = res.output.strip().splitlines()
    assert "too small" in line and "(the budget is 95% of the 0.2 GiB available now (MemAvailable)" in line
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.partial").exists()


RETAIN = """
import sys, torch
from lowmem_bonsai.machine import release_freed_memory
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
a = torch.ones(8 << 20, dtype=torch.uint8)  # a mapped 8 MB buffer, freed: glibc's threshold rises
del a
base = rss()
big, small = [], []
for _ in range(100):
    big.append(torch.ones(3 << 20, dtype=torch.uint8))  # 3 MB row-chunk-like buffers, touched
    small.append(torch.ones(32 << 10))  # long-lived 128 kB ones between them
del big
held = rss() - base
done = release_freed_memory()
print(int(done), held, rss() - base)
"""


def test_freed_buffers_go_back_to_the_system():
    """A streamed pass frees buffers of a few MB by the thousand; glibc serves them from a heap
    (its threshold rises to the largest buffer freed) and keeps them resident once freed, between
    long-lived small ones. ``release_freed_memory``, called between a run's phases, returns them."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc_trim: Linux only")
    out = subprocess.run([sys.executable, "-c", RETAIN], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 0, out.stderr
    done, held, after = map(int, out.stdout.split())
    if not done:
        pytest.skip("not glibc: no malloc_trim")
    if held < 100 * 2**20:
        pytest.skip(f"this C library returned the freed buffers by itself ({held} bytes held)")
    assert after < 32 * 2**20, (held, after)  # of 300 MB freed (the 12.5 MB of small ones are live)


def test_host_info_names_the_cpu_and_its_bf16_instructions(tmp_path):
    """A report says which CPU pruned (bf16 rounds may choose other units on another CPU): the
    first stanza of /proc/cpuinfo gives the model name and the bf16 flags among its flags."""
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(
        "processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile avx512f\n\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu avx512_bf16\n")
    info = host_info(root=tmp_path)
    assert info["cpu"] == "Example CPU 9000" and info["bf16_instructions"] == ["amx_bf16"]
    assert info["cores"] >= 1 and info["torch_threads"] >= 1 and info["torch"]
    bare = host_info(root=tmp_path / "nothing")  # no /proc (macOS): the platform's name, no flags
    assert bare["cpu"] and bare["bf16_instructions"] == []
