"""Processes for the tests: free loopback ports, commands in their own process group with a log
file, their reaping by pid, waits that fail with the log's tail, and a local Ray head.

Every command starts in a new session (its own process group), so stopping it reaches its
children; a Ray node is also swept by its private ``--temp-dir`` (every Ray process names it on
its command line). ``ray stop`` is never used: it stops every Ray instance of the machine,
other tests' included.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
T = TypeVar("T")


# --- ports -------------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


# --- finding and killing processes (Linux /proc) -----------------------------------------------
def pids_naming(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (arguments are NUL-separated)."""
    found = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and fields[0] != "Z" and fields[2] == str(pgid):
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def kill_all(pids: Sequence[int], timeout: float = 10.0) -> None:
    """SIGKILL ``pids`` and wait until they are gone (or zombies)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


# --- one command -------------------------------------------------------------------------------
class Proc:
    """``argv`` in its own session, stdout (and stderr, unless ``err_log``) to ``log``.

    `stop` ends it and whatever is left of its group and, with ``sweep``, of every process whose
    command line names ``sweep`` (a Ray node's temp dir). Usable as a context manager.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
        err_log: Path | None = None,
        sweep: str | None = None,
        grace: float = 20.0,
        name: str | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        self.log, self.err_log = log, err_log
        self.sweep = sweep
        self.grace = grace
        log.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as files:
            out = files.enter_context(log.open("ab"))
            err = files.enter_context(err_log.open("ab")) if err_log else subprocess.STDOUT
            self.popen = subprocess.Popen(
                self.argv,
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid = self.popen.pid  # = its process group

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def output(self, chars: int = 6000) -> str:
        """The last ``chars`` characters of its log."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL to the process alone: no shutdown hook runs."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM to the process (Ray and uvicorn shut down on it), up to ``grace`` seconds,
        then SIGKILL to whatever is left of its group and of the processes naming ``sweep``."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=self.grace)
        left = set(group_members(self.pid))
        if self.sweep:
            left |= set(pids_naming(self.sweep))
        kill_all(sorted(left))
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(argv: Sequence[str], log: Path, timeout: float, **kw) -> int | None:
    """``Proc(argv, log, **kw)`` to completion; its exit status, or None when it was still
    running after ``timeout`` seconds (then it was stopped)."""
    with Proc(argv, log, **kw) as proc:
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


# --- waiting -----------------------------------------------------------------------------------
class NotYet(Exception):
    """Raised by a `wait_until` probe: not there yet (the message says what it saw)."""


def fail(message: str, proc: Proc | None = None) -> None:
    """Fails the test with ``message`` and, given ``proc``, the tail of its log."""
    if proc is not None:
        message += f"\n--- {proc.name} ({shlex.join(proc.argv)}), the end of {proc.log}:\n"
        message += proc.output()
    pytest.fail(message)


def wait_until(
    probe: Callable[[], T],
    what: str,
    timeout: float,
    proc: Proc | None = None,
    interval: float = 0.05,
) -> T:
    """``probe()``'s value once it stops raising `NotYet`.

    Fails the test, with ``what``, the last thing seen and ``proc``'s log tail, when ``proc``
    exits first, when ``timeout`` seconds pass, or when ``probe`` raises anything else.
    """
    deadline = time.monotonic() + timeout
    seen = "nothing yet"
    while True:
        if proc is not None and proc.poll() is not None:
            fail(f"{what}: {proc.name} exited with {proc.poll()} first (last seen: {seen})", proc)
        try:
            return probe()
        except NotYet as e:
            seen = str(e)
        except Exception as e:
            fail(f"{what}: {e}", proc)
        if time.monotonic() > deadline:
            fail(f"{what}: not after {timeout:.0f} s (last seen: {seen})", proc)
        time.sleep(interval)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET to ``url``, never through a proxy; `NotYet` without an answer."""
    try:
        with _NO_PROXY.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        raise NotYet(f"GET {url}: {e}") from e


def wait_for_http(url: str, timeout: float, proc: Proc | None = None) -> int:
    """Waits until ``url`` answers at all (any HTTP status); the status."""
    return wait_until(lambda: http_get(url)[0], f"{url} did not answer", timeout, proc, 0.5)


# --- Ray ---------------------------------------------------------------------------------------
def short_temp_dir(prefix: str) -> str:
    """A new directory under /tmp, short enough for Ray's socket paths (107 bytes at most)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


RAY_TEST_TOKEN = secrets.token_hex(16)  # this test session's Ray token


def ray_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a Ray node or client kept on 127.0.0.1, with token authentication on (as in
    production): ``env``'s RAY_AUTH_TOKEN, else `RAY_TEST_TOKEN`."""
    return {
        **{k: v for k, v in env.items() if not k.startswith("RAY_ADDRESS")},
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single node: every Ray process on 127.0.0.1
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": env.get("RAY_AUTH_TOKEN") or RAY_TEST_TOKEN,
    }


def ray_node_args(temp_dir: str) -> list[str]:
    """``ray start`` flags that keep a node on 127.0.0.1: free ports for its client server,
    agents and metrics, and ``temp_dir`` as its temp dir."""
    names = (
        "ray-client-server-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    ports = [f"--{name}={port}" for name, port in zip(names, free_ports(len(names)))]
    return [f"--node-ip-address={LOOPBACK}", *ports, f"--temp-dir={temp_dir}"]


def drop_flags(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """``argv`` without the flags ``names`` (``--name value`` and ``--name=value``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif arg.split("=", 1)[0] not in names:
            out.append(arg)
    return out


class RayHead:
    """``ray start --head --block`` on 127.0.0.1 with free ports, its own temp dir and ``cpus``
    CPUs; `address` is its dashboard (the job API). Stopped by pid (`Proc.stop`, swept by its
    temp dir), its temp dir removed."""

    def __init__(
        self, head_args: Sequence[str] = (), env: dict[str, str] | None = None, cpus: int = 2
    ) -> None:
        """``head_args``: more ``ray start --head`` arguments; their ``--port`` and
        ``--dashboard-port`` give way to free ports."""
        self.temp_dir = short_temp_dir("srhead-")
        gcs, dash = free_ports(2)
        args = drop_flags(head_args, ("--port", "--dashboard-port"))
        argv = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            *[a for a in args if a not in ("ray", "start", "--head", "--block")],
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            f"--dashboard-host={LOOPBACK}",
            "--include-dashboard=true",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            "--disable-usage-stats",
            *ray_node_args(self.temp_dir),
        ]
        self.env = ray_env(env if env is not None else dict(os.environ))
        self.address = f"http://{LOOPBACK}:{dash}"
        self.gcs_address = f"{LOOPBACK}:{gcs}"  # for ``ray start --address`` and ray.init
        self.proc = Proc(
            argv,
            Path(self.temp_dir) / "head.log",
            env=self.env,
            cwd=Path(self.temp_dir),
            sweep=self.temp_dir,
            grace=40,
            name="ray start --head",
        )

    def wait_ready(self, timeout: float = 120.0) -> RayHead:
        """Waits until the dashboard answers (fails with the head's log)."""
        wait_for_http(f"{self.address}/api/version", timeout, self.proc)
        return self

    def stop(self) -> None:
        try:
            self.proc.stop()
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


# --- an S3-compatible server -------------------------------------------------------------------
MOTO_ENV = "SHARDREC_MOTO_SERVER"
S3_CREDENTIALS = {  # moto accepts any; the standard AWS variables pyarrow reads
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """``os.environ`` with ``values`` set while inside (each key restored or removed after)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def moto_server_binary() -> str | None:
    """moto's ``moto_server``: ``$SHARDREC_MOTO_SERVER``, beside this Python, in the checkout's
    ``.venv-moto`` (``make install``), or on PATH."""
    candidates = (
        os.environ.get(MOTO_ENV),
        BIN / "moto_server",
        REPO / ".venv-moto" / "bin" / "moto_server",
        shutil.which("moto_server"),
    )
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


class MotoServer:
    """moto's S3 server (``moto_server``) on 127.0.0.1 with a free port, one bucket made.

    `uri(prefix)` is an ``s3://`` URI with the endpoint in its query (pyarrow's
    ``endpoint_override``); the credentials are `S3_CREDENTIALS`, which the caller puts in the
    environment of every process that opens it. Skips the test when moto is not installed.
    """

    def __init__(self, log_dir: Path, bucket: str = "shardrec") -> None:
        binary = moto_server_binary()
        if binary is None:
            pytest.skip(
                "moto_server not found: install it with `pip install 'moto[server]'` (into "
                f"this venv, or into another one and set {MOTO_ENV} to its moto_server)"
            )
        self.port, self.bucket = free_port(), bucket
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        env = {**os.environ, **S3_CREDENTIALS}
        env = {k: v for k, v in env.items() if not k.lower().endswith("_proxy")}
        self.proc = Proc(
            [binary, "-H", LOOPBACK, "-p", str(self.port)],
            log_dir / "moto.log",
            env=env,
            name="moto_server",
        )
        wait_for_http(f"{self.endpoint}/moto-api/", 60, self.proc)
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            access_key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
            endpoint_override=self.endpoint,
            allow_bucket_creation=True,
        )
        fs.create_dir(bucket)

    def uri(self, prefix: str) -> str:
        return (
            f"s3://{self.bucket}/{prefix}?endpoint_override={LOOPBACK}:{self.port}&scheme=http"
            f"&region={S3_CREDENTIALS['AWS_DEFAULT_REGION']}"
        )

    def stop(self) -> None:
        self.proc.stop()
