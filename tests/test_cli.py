"""Every command turns a bad flag value into one line ``error: ...`` and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lowmem_bonsai.cli import app

from .conftest import make_tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m")
    make_tiny(path, "llama-gqa-tied")
    return path


BAD = {  # command: (arguments with one bad flag value, words of the error)
    "import-gguf": (["{gguf}", "--out", "{tmp}/o", "--dtype", "int8"], "dtype 'int8' is not supported"),
    "eval": (["{model}", "--data", "{text}", "--dtype", "int8"], "dtype 'int8' is not one of"),
    "estimate": (["{model}", "--method", "nope"], "--method nope: expected one of bonsai"),
    "prune": (["{model}", "--out", "{tmp}/p", "--calib", "{text}", "--estimator", "nope"],
              "estimator must be ridge, lasso or prior"),
    "export-gguf": (["{model}", "--out", "{tmp}/x.gguf", "--type", "q3"], "--type 'q3' is not supported"),
    "generate": (["{gguf}", "--prompt", "hi", "-n", "0"], "-n 0: expected at least 1 token"),
    "serve": (["{gguf}", "--port", "70000"], "--port 70000: expected a port number from 1 to 65535"),
}


def test_every_command_is_covered():
    commands = {c.name for c in app.registered_commands}
    assert commands == set(BAD)


@pytest.mark.parametrize("command", sorted(BAD))
def test_bad_flag_value_is_one_line_and_exit_2(command, model, tmp_path):
    args, words = BAD[command]
    (tmp_path / "t.txt").write_text("some words " * 100)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    fill = dict(model=model, tmp=tmp_path, text=tmp_path / "t.txt", gguf=tmp_path / "m.gguf")
    res = CliRunner().invoke(app, [command, *(a.format(**fill) for a in args)])
    assert res.exit_code == 2, (res.output, res.exception)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.output


def test_installed_entry_point_catches_too(tmp_path):
    # The console script runs the app outside CliRunner: the same one line and status 2.
    res = subprocess.run([sys.executable, "-m", "lowmem_bonsai.cli", "import-gguf", str(tmp_path / "X.gguf"),
                          "--out", str(tmp_path / "d"), "--dtype", "int8"], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == ["error: dtype 'int8' is not supported; expected one of "
                                               "float32, bfloat16, float16"]
