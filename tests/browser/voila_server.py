"""Serve notebooks with Voila on localhost for the browser test."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def voila_executable() -> Path | None:
    """The ``voila`` script next to this interpreter (the project's venv), if installed."""
    exe = Path(sys.executable).with_name("voila")
    return exe if exe.is_file() else None


class VoilaServer:
    """``voila ROOT`` on 127.0.0.1 without a token; notebooks render at ``url(name)``.

    ``env`` is added to the environment of the server and its kernels (e.g. ``CORRLAB_NB_FAST=1``).
    The server's log goes to ``log_path``. Use as a context manager; ``stop()`` ends the server and its kernels.
    """

    def __init__(self, root: Path, log_path: Path, env: dict | None = None, cell_timeout: int = 300):
        self.root = Path(root)
        self.port = free_port()
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.cell_timeout = cell_timeout
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, notebook: str) -> str:
        return f"{self.base_url}/voila/render/{notebook}"

    def start(self, timeout: float = 90.0) -> "VoilaServer":
        exe = voila_executable()
        if exe is None:
            raise RuntimeError(f"voila is not installed next to {sys.executable}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        cmd = [
            str(exe), str(self.root), "--no-browser", f"--port={self.port}", "--Voila.ip=127.0.0.1",
            "--Voila.token=", "--show_tracebacks=True", f"--NotebookClient.timeout={self.cell_timeout}",
        ]
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"voila exited with {self.process.returncode}; log:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"voila did not answer on {self.base_url} within {timeout:.0f} s; log:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.terminate()  # voila shuts its kernels down on SIGTERM
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)  # the server's own session (start_new_session): itself and its kernels
            p.wait(timeout=10)

    def __enter__(self) -> "VoilaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
