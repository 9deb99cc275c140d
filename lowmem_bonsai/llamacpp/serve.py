"""`lowmem-bonsai serve FILE.gguf`: the model behind llama.cpp's OpenAI-compatible HTTP server.

The server is llama-cpp-python's (its ``server`` extra: FastAPI under uvicorn), run in this
process: ``POST /v1/chat/completions`` (with the GGUF's own chat template), ``/v1/completions``,
``GET /v1/models``. This module only checks the inputs, so that a wrong file or a busy port is one
line, and hands over.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from .check import checked_gguf, trained_context

log = logging.getLogger(__name__)


def check_address(host: str, port: int) -> None:
    """Refuse, in one line, a port out of range or an address this machine cannot listen on."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: expected a port number from 1 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: not an address of this machine ({exc.strerror}); "
                        "expected e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(addr)
        except OSError as exc:
            raise UserError(f"{host}:{port}: cannot listen there ({exc.strerror}); pick another "
                            "--port, or stop what is using it") from None


DEFAULT_CTX = 2048  # tokens of context a server holds unless told otherwise


def serve(*, gguf: Path, host: str = "127.0.0.1", port: int = 8080, n_ctx: int | None = None,
          threads: int | None = None, on_start: Callable[[str], None] | None = None) -> None:
    """Serve ``gguf`` over HTTP until interrupted (Ctrl-C); ``on_start`` gets the base URL once
    the model is loaded, just before the server listens. ``n_ctx``: the context window, at most
    the model's trained one (None: :data:`DEFAULT_CTX`, or the trained one where smaller)."""
    if n_ctx is not None and n_ctx < 16:  # the flags first: they cost nothing to check
        raise UserError(f"--ctx {n_ctx}: expected at least 16 tokens of context")
    check_address(host, port)
    summary = checked_gguf(gguf)  # what would make llama.cpp abort the process is refused here
    path, trained = summary.path, trained_context(summary)
    if n_ctx is None:
        n_ctx = min(DEFAULT_CTX, trained or DEFAULT_CTX)
    elif trained is not None and n_ctx > trained:
        raise UserError(f"--ctx {n_ctx}: more than the {trained} tokens of context {path} runs at "
                        f"(its context_length and rope scaling); pass --ctx {trained} or less")
    try:
        import uvicorn
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as exc:
        raise UserError(f"serving needs llama-cpp-python's server extra ({exc.name} is missing); "
                        "pip install 'llama-cpp-python[server]', or bash tools/setup.sh") from None
    # Half the cores, as for generate: llama.cpp's threads spin while they wait.
    n = threads or max(1, (os.cpu_count() or 2) // 2)
    model = ModelSettings(model=str(path), model_alias=path.stem, n_ctx=n_ctx, n_threads=n,
                          n_threads_batch=n, verbose=False)
    try:
        app = create_app(server_settings=ServerSettings(host=host, port=port),
                         model_settings=[model])
    except ValueError as exc:  # llama-cpp-python's wording for every load failure
        raise UserError(f"{path}: llama.cpp could not load it ({exc}); re-export the model") from None
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1"
    log.info("serving %s on %s (%d threads)", path, url, n)
    if on_start is not None:
        on_start(url)
    uvicorn.run(app, host=host, port=port, log_level="warning")
