"""A wheel, installed without the repository around it, still finds its profiles."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_profiles(tmp_path):
    # Build from a copy of the sources: setuptools reuses a build/ folder left in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part)
    for part in ("lowmem_bonsai", "profiles"):
        shutil.copytree(ROOT / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, capture_output=True)
    (wheel,) = wheels.glob("lowmem_bonsai-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for toml in (ROOT / "profiles").glob("*.toml"):
        assert f"lowmem_bonsai/_profiles/{toml.name}" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, capture_output=True)
    # Run from an empty folder with only the installed copy importable first.
    code = ("import lowmem_bonsai.profiles as p; from pathlib import Path; "
            f"assert Path(p.__file__).is_relative_to({str(site)!r}), p.__file__; "
            "print(p.load_profile(None).name, p.load_profile('quick').masks_per_round)")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.split() == ["laptop-16gb", "32"]
