"""Real servers for the service tests: uvicorn in a thread or in a subprocess, and redis-server,
on 127.0.0.1.

Each binds a free loopback port and is always stopped by its fixture, by pid; the subprocesses
and the waits are tests/procs.py's. `RedisServer` skips the test, saying why, when redis-server
is not installed (``make install`` installs it where it can).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from tests.procs import NotYet, Proc, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


def run_python(args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    """``python <args>`` in the checkout, its output captured (not checked)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


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


class RedisServer:
    """``redis-server`` on a free 127.0.0.1 port with its own data directory ``data_dir``,
    append-only file fsynced before every answer (``appendfsync always``). `kill` is a SIGKILL;
    `start` again reuses the directory (what survived is what the AOF holds)."""

    def __init__(self, data_dir: Path, fsync: str = "always") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip(
                "redis-server is not installed (`make test` installs it with apt-get when run "
                "as root; or apt-get install -y redis-server)"
            )
        self.binary = binary
        self.data_dir = data_dir
        self.fsync = fsync
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Proc | None = None

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.fsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        self.proc = Proc(argv, self.data_dir / "redis.log", name="redis-server")

        def pong() -> None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if not sock.recv(64).startswith(b"+PONG"):
                        raise NotYet("no PONG")
            except OSError as e:
                raise NotYet(repr(e)) from e

        wait_until(pong, f"redis-server on port {self.port}", 30, self.proc)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync."""
        assert self.proc is not None
        self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerProcess:
    """``python -m service serve`` in a subprocess of its own process group (`tests.procs.Proc`),
    its output in ``log`` (a temporary file, removed at the end, when none is given).

    Entered once ``/readyz`` says 200 and, with ``--workers N``, once all N worker processes
    have loaded a model (each loads in the background: one ready worker says nothing of the
    others, which answer 503 until their own load is done)."""

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
        if (workers := self.workers) > 1:
            wait_versions([self.url], workers, timeout=120, proc=self.proc)
        return self

    @property
    def workers(self) -> int:
        """The ``--workers`` given (1 when none)."""
        if "--workers" in self.args:
            return int(self.args[self.args.index("--workers") + 1])
        return 1

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


def model_versions(url: str) -> dict[str, str]:
    """pid -> the model version each worker process of a server serves (its metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {}
    for labels, value in re.findall(r"^shardrec_model_info\{([^}]*)\} (\S+)$", text, re.M):
        parts = dict(p.split("=", 1) for p in labels.split(","))
        if float(value) == 1.0:
            found[parts["pid"].strip('"')] = parts["version"].strip('"')
    return found


def wait_versions(
    urls: Sequence[str],
    workers: int,
    timeout: float,
    version: str | None = None,
    proc: Proc | None = None,
) -> float:
    """Until each of ``urls`` has ``workers`` processes serving one model (``version`` when
    given); the seconds it took."""
    start = time.monotonic()

    def all_there() -> None:
        seen = {url: model_versions(url) for url in urls}
        for v in seen.values():
            if len(v) != workers or len(set(v.values())) != 1:
                raise NotYet(str(seen))
            if version is not None and set(v.values()) != {version}:
                raise NotYet(str(seen))

    wait_until(all_there, f"{workers} workers on one model", timeout, proc, interval=0.05)
    return time.monotonic() - start


class Hammer:
    """Threads posting ``/v1/recommend`` in a loop to ``urls`` (thread ``w`` to
    ``urls[w % len(urls)]``); records ``(start, end, status, version or error, url)``."""

    def __init__(self, urls: str | Sequence[str], threads: int = 6) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.threads = threads
        self.records: list[tuple[float, float, int, str | None, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads)
        self._futures: list = []

    def _loop(self, worker: int) -> None:
        url = self.urls[worker % len(self.urls)]
        with httpx.Client(base_url=url, timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                payload = {"user_id": str(1 + (worker * 97 + i) % 600), "k": 10}
                if i % 3 == 0:
                    payload = {"history": [str(1 + i % 300)], "k": 5}
                start = time.monotonic()
                try:
                    r = client.post("/v1/recommend", json=payload)
                    status = r.status_code
                    version = r.json().get("model_version") if status == 200 else r.text
                except httpx.HTTPError as e:
                    status, version = -1, repr(e)
                with self._lock:
                    self.records.append((start, time.monotonic(), status, version, url))

    def __enter__(self) -> Hammer:
        self._futures = [self._pool.submit(self._loop, w) for w in range(self.threads)]
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for f in self._futures:
            f.result()
        self._pool.shutdown()

    def wait_for(self, count: int, timeout: float = 60) -> None:
        """Until ``count`` more requests have been answered."""
        target = len(self.records) + count

        def enough() -> None:
            if len(self.records) < target:
                raise NotYet(f"{len(self.records)} of {target} requests")

        wait_until(enough, f"{count} more requests", timeout, interval=0.01)

    def failures(self) -> list[tuple[float, float, int, str | None, str]]:
        return [r for r in self.records if r[2] != 200]
