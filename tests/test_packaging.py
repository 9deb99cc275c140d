"""A wheel, installed without the repository around it, still finds its profiles and texts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import WIKITEXT

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_profiles_and_texts(tmp_path):
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
    # The bundled text too: read by name from the installed copy, its sha256 checked on the way.
    code = ("import lowmem_bonsai.profiles as p, lowmem_bonsai.texts as t; from pathlib import Path; "
            "from lowmem_bonsai.data import read_text; "
            f"assert Path(p.__file__).is_relative_to({str(site)!r}), p.__file__; "
            f"assert t.bundled_path('wikitext2-valid').is_relative_to({str(site)!r}); "
            "print(p.load_profile(None).name, p.load_profile('quick').masks_per_round, "
            "len(read_text('wikitext2-valid')))")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert out.split() == ["laptop-16gb", "32", str(len(WIKITEXT.read_text(encoding="utf-8")))]
    assert {"lowmem_bonsai/_texts/wikitext2-valid.txt", "lowmem_bonsai/_texts/README.md"} <= names
