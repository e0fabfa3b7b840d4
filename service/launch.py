"""Run ``python -m service serve`` as a child process on a free loopback port (`launch`).

For programs that start their own server and talk to it: the demo (`demo.client`) and the
serving benchmark (`benchmarks.serve`). The server runs in its own session (process group), its
output goes to a log file, `LocalServer.wait_ready` polls ``/readyz`` (progress through a
callback) and fails with the log's tail, and `LocalServer.stop` ends the whole group (uvicorn's
worker processes included): SIGTERM, then SIGKILL after a grace period. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
PORT_TRIES = 3
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LaunchError(RuntimeError):
    """The server exited, failed to load its model, or was not ready in time."""


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve_argv(
    artifacts: Path, port: int, flags: Sequence[str] = (), host: str = HOST
) -> list[str]:
    """The command line of ``python -m service serve`` for ``artifacts`` on ``host:port``."""
    return [
        sys.executable,
        "-m",
        "service",
        "serve",
        "--artifacts",
        str(artifacts),
        "--host",
        host,
        "--port",
        str(port),
        *flags,
    ]


def request_json(
    url: str,
    method: str = "GET",
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, Any]:
    """(status, decoded JSON answer or its text) of a request with a JSON ``body``, never
    through a proxy; raises OSError when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, method=method, headers=sent)
    try:
        with _NO_PROXY.open(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        text = e.read().decode("utf-8", "replace")
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text


class LocalServer:
    """One ``python -m service serve`` child process.

    Args:
        artifacts: the artifact directory to serve.
        log: where its output goes (appended).
        port: the port (a free one by default).
        flags: more ``serve`` flags (``--workers 2``, ``--store redis``, ...).
        env: its environment (this process's by default).
        cwd: its working directory.
    """

    def __init__(
        self,
        artifacts: Path,
        log: Path,
        *,
        port: int | None = None,
        flags: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        host: str = HOST,
    ) -> None:
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.argv = serve_argv(artifacts, self.port, flags, host)
        self.log = log
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "start() first"
        return self.proc.pid

    def start(self) -> LocalServer:
        logger.info("starting %s", " ".join(self.argv))
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of its log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(
        self,
        timeout: float,
        progress: Callable[[str, float], None] | None = None,
        interval: float = 0.25,
    ) -> dict[str, Any]:
        """``/readyz``'s body once it answers 200; ``progress(status, waited_s)`` is called on
        each poll until then.

        Raises:
            LaunchError: the process exited, the model failed to load, or ``timeout`` passed.
        """
        assert self.proc is not None, "start() first"
        start = time.monotonic()
        status = "starting"
        while True:
            if self.proc.poll() is not None:
                raise LaunchError(
                    f"the API server exited with {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                code, body = request_json(f"{self.url}/readyz", timeout=2)
            except OSError:  # not listening yet
                code, body = 0, None
            if code == 200:
                return body
            if isinstance(body, dict):
                status = body.get("status", status)
                if status == "failed":
                    raise LaunchError(f"the model failed to load: {body.get('detail')}")
            waited = time.monotonic() - start
            if waited > timeout:
                raise LaunchError(f"the API was not ready after {timeout:.0f}s ({status})")
            if progress is not None:
                progress(status, waited)
            time.sleep(interval)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to its process group (uvicorn shuts down gracefully), SIGKILL to what is
        left after ``grace`` seconds; waits for the exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                logger.warning("the API server did not stop in %.0f s; killing it", grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers left behind, if any
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        logger.info("API server stopped (exit %s)", self.proc.returncode)


@contextlib.contextmanager
def launch(
    artifacts: Path,
    log: Path,
    timeout: float,
    *,
    port: int | None = None,
    progress: Callable[[str, float], None] | None = None,
    on_start: Callable[[LocalServer], None] | None = None,
    **kwargs: Any,
) -> Iterator[tuple[LocalServer, dict[str, Any]]]:
    """A ready `LocalServer` and its ``/readyz`` body; stopped when the block exits (also on an
    error or Ctrl-C). Without ``port`` a free one is picked, and picked again (up to
    `PORT_TRIES` times) when another process took it in between."""
    for attempt in range(1, PORT_TRIES + 1):
        server = LocalServer(artifacts, log, port=port, **kwargs)
        if on_start is not None:
            on_start(server)
        server.start()
        try:
            ready = server.wait_ready(timeout, progress)
        except LaunchError:
            server.stop()
            taken = "address already in use" in server.tail()
            if port is None and attempt < PORT_TRIES and taken:
                continue
            raise
        except BaseException:
            server.stop()
            raise
        try:
            yield server, ready
        finally:
            server.stop()
        return
