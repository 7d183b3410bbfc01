"""A local OpenAI-compatible model server for guard mode's tests and bench: llama.cpp's own
(``python -m llama_cpp.server`` from ``llama-cpp-python[server]``) serving a built-in model's
GGUF, the same file the monitor reads, on a loopback port.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from monitor.localservices import free_port, stop_process, wait_http
from monitor.models import BUILTIN_MODELS
from monitor.models.fetch import fetch_gguf


class LlamaServer:
    """``with LlamaServer(cache_dir) as s:`` serves the model at ``s.base_url`` (``.../v1``)."""

    def __init__(
        self,
        cache_dir: Path,
        model: str = "smollm2-135m-instruct",
        threads: int = 1,
        n_ctx: int = 2048,
    ) -> None:
        self.gguf = fetch_gguf(BUILTIN_MODELS[model], cache_dir)
        self.model = model
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.threads = threads
        self.n_ctx = n_ctx
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> LlamaServer:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "llama.cpp's server comes with llama-cpp-python: "
                "pip install 'llama-cpp-python[server]'"
            ) from exc
        args = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(self.gguf), "--model_alias", self.model,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.n_ctx), "--n_threads", str(self.threads),
        ]  # fmt: skip
        # Its log goes to a file: llama.cpp writes a lot, and a full pipe would stall it.
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"{self.base_url}/models", self.proc, timeout, "llama.cpp's server",
                      Path(self.log.name))  # fmt: skip
            self._first_token(timeout)
        except RuntimeError:
            self.stop()
            raise
        return self

    def _first_token(self, timeout: float) -> None:
        """One token generated, or RuntimeError saying how the server died: a llama.cpp built
        with CPU code the machine will not run (AMX in some virtual machines) answers its model
        list and then dies on the first token, which clients see only as a broken connection."""
        import httpx

        assert self.proc is not None
        body = {"model": self.model, "messages": [{"role": "user", "content": "Hi"}]}
        try:
            r = httpx.post(
                f"{self.base_url}/chat/completions",
                json={**body, "max_tokens": 1},
                timeout=min(timeout, 60),
            )
            r.raise_for_status()
        except httpx.HTTPError as exc:
            try:
                code = self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            tail = Path(self.log.name).read_bytes()[-1500:].decode(errors="replace")
            died = "is still running" if code is None else f"exited with status {code}"
            hint = (
                " (killed by a signal: llama-cpp-python built for another CPU? `rm -rf .venv "
                "&& make venv` builds it portable, see the Makefile's llama-wheel)"
            )
            raise RuntimeError(
                f"llama.cpp's server could not generate a token ({type(exc).__name__}: {exc}); "
                f"it {died}{hint if code is not None and code < 0 else ''}: {tail}"
            ) from None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.log.close()
            self.proc = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
