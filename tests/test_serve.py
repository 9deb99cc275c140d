"""`lowmem-bonsai serve`: a tiny exported GGUF behind llama.cpp's OpenAI-compatible server."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from typer.testing import CliRunner

from lowmem_bonsai.cli import app
from lowmem_bonsai.llamacpp.to_gguf import export_gguf

from .test_gguf_export import tiny

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None,
    reason="llama-cpp-python's server extra not installed (pip install 'llama-cpp-python[server]')")

START_S = 90  # loading a tiny model takes a second; a loaded 2-core machine, far longer
ANSWER_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny random model with a chat template, exported to GGUF."""
    root = tmp_path_factory.mktemp("serve")
    tiny(root / "m", "llama-gqa-tied")
    return export_gguf(model_dir=root / "m", out=root / "m.gguf", type="f32")


def test_serve_answers_a_chat_completion_and_stops(tiny_gguf):
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    proc = subprocess.Popen([sys.executable, "-m", "lowmem_bonsai.cli", "serve", str(tiny_gguf),
                             "--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=5) as resp:
                    models = json.loads(resp.read())
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, f"server not up after {START_S} s"
                time.sleep(0.5)
        assert models["data"][0]["id"] == "m"  # the alias: the file's stem
        out = post(f"{base}/chat/completions", {
            "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0,
        }, timeout=ANSWER_S)
        choice = out["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert 1 <= out["usage"]["completion_tokens"] <= 6 and out["usage"]["prompt_tokens"] >= 2
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail("server did not stop within 30 s of SIGINT")
    log = proc.stdout.read()
    assert f"serving {tiny_gguf} at {base}" in log
    with pytest.raises(ConnectionRefusedError):  # nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_serve_refuses_bad_input_in_one_line(tmp_path, tiny_gguf):
    runner = CliRunner()
    (tmp_path / "bad.gguf").write_bytes(b"nope")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        for args, words in [([str(tmp_path / "bad.gguf")], "not a GGUF file"),
                            ([str(tmp_path / "none.gguf")], "no such file"),
                            ([str(tiny_gguf), "--port", "70000"], "from 1 to 65535"),
                            ([str(tiny_gguf), "--host", "no.such.host.invalid"], "not an address"),
                            ([str(tiny_gguf), "--port", str(busy.getsockname()[1])], "cannot listen"),
                            ([str(tiny_gguf), "--threads", "0"], "--threads 0: expected at least 1"),
                            ([str(tiny_gguf), "--ctx", "100000000"], "--ctx 100000000: more than the")]:
            res = runner.invoke(app, ["serve", *args])
            assert res.exit_code == 2, res.output
            assert words in res.output and len(res.output.strip().splitlines()) == 1, res.output
    finally:
        busy.close()


def test_generate_refuses_more_tokens_than_the_context_in_one_line(tiny_gguf):
    """llama.cpp would try to size a context for them, print its own warning and fail."""
    res = CliRunner().invoke(app, ["generate", str(tiny_gguf), "--prompt", "hi", "-n", "100000000"])
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert "-n 100000000:" in res.output and "tokens (prompt and answer together)" in res.output
