"""Real servers for the service tests: uvicorn in a thread or in a subprocess, on 127.0.0.1.

Both bind a free loopback port and are always stopped by their fixtures; the subprocess and the
waits are tests/procs.py's.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from tests.procs import NotYet, Proc, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


def train_tiny(out_dir: Path, seed: int) -> Path:
    """A tiny synthetic model (600 users, 300 items, D = 16) in a few seconds; its artifacts."""
    from trainer.config import load_config
    from trainer.pipeline import run_training

    cfg = load_config(
        None,
        [
            "data.synthetic.num_users=600",
            "data.synthetic.num_items=300",
            "data.synthetic.dim=8",
            "data.synthetic.mean_sequence_length=20",
            f"data.synthetic.seed={seed}",
            "model.embedding_dim=16",
            "model.hidden=[32]",
            "loss.num_sampled=64",
            "batch_size=128",
            "epochs=2",
            "progress=false",
            "num_threads=1",
            f"seed={seed}",
            f"out_dir={out_dir}",
        ],
    )
    return run_training(cfg)


class ServerThread:
    """``uvicorn.Server`` running ``app`` in a background thread on a free loopback port."""

    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self._thread.start()

        def started() -> None:
            if not self._thread.is_alive():
                raise RuntimeError("its thread ended")
            if not self.server.started:
                raise NotYet("starting")

        wait_until(started, f"uvicorn on {self.url}", 30, interval=0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()
        assert not self._thread.is_alive(), "uvicorn thread did not stop"


class ServerProcess:
    """``python -m service serve`` in a subprocess of its own process group (`tests.procs.Proc`),
    its output in ``log`` (a temporary file, removed at the end, when none is given)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "service", "serve", "--port", str(self.port), *args]
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SHARDREC_")},
            **(env or {}),
        }
        self.log = log
        self.proc: Proc | None = None
        self._temp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> ServerProcess:
        if self.log is None:
            self._temp = tempfile.TemporaryDirectory(prefix="srserve-")
            self.log = Path(self._temp.name) / "server.log"
        self.proc = Proc(self.args, self.log, env=self.env, name="service serve")
        wait_ready(self.url, proc=self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs."""
        assert self.proc is not None
        self.proc.kill()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.stop()
        if self._temp is not None:
            self._temp.cleanup()


def wait_ready(url: str, timeout: float = 60.0, proc: Proc | None = None) -> None:
    """Polls ``/readyz`` until 200; fails the test (with ``proc``'s log) on a timeout, a failed
    model load or an exit of ``proc``."""

    def ready() -> None:
        try:
            r = httpx.get(f"{url}/readyz", timeout=2)
        except httpx.TransportError as e:
            raise NotYet(repr(e)) from e
        if r.status_code == 200:
            return
        if r.json().get("status") == "failed":
            raise RuntimeError(f"model load failed: {r.text}")
        raise NotYet(r.text)

    wait_until(ready, f"{url} ready", timeout, proc)
