"""Every process of the container deployment, defined once: ``python docker/run.py ROLE``.

docker/docker-compose.yml runs each service as ``python docker/run.py <role>`` (and its
healthchecks as ``python docker/run.py check-<role>``); tests/deployment/test_topology.py reads
those same ``command`` / ``healthcheck`` / ``environment`` entries from the compose file and runs
them as local processes on 127.0.0.1. The command lines therefore live here and nowhere else.

Roles:

    ray-head      ray start --head --block (GCS, dashboard and job API)
    ray-worker    ray start --block --address <head>:<port> (joins the cluster)
    train         ray job submit --address http://<head>:<dashboard> --working-dir . --
                      python -m trainer train --config ... --out <run dir> --ray-address auto ...
                  waits for the job; exit status 0 only when the job succeeded and the
                  artifacts exist (a stopped job is a failure)
    serve         python -m service serve --artifacts ... --host ... --port ...
    check-head    healthcheck: the dashboard's job API answers
    check-worker  healthcheck: this host is an alive node of the head's cluster
    check-api     healthcheck: GET /readyz is 200 (a model is loaded)

Settings (environment variables, default in brackets):

    SHARDREC_RAY_HEAD          head host name [127.0.0.1]
    SHARDREC_RAY_PORT          GCS port [6379]
    SHARDREC_DASHBOARD_HOST    dashboard interface of the head [127.0.0.1]
    SHARDREC_DASHBOARD_PORT    dashboard / job API port [8265]
    SHARDREC_RAY_CPUS          --num-cpus of this node [Ray's detection]
    SHARDREC_RAY_GPUS          --num-gpus of this node [Ray's detection]
    SHARDREC_RAY_ARGS          more ``ray start`` arguments (shell words) []
    SHARDREC_RUN_DIR           training output directory, artifacts in <dir>/artifacts [runs/ray]
    SHARDREC_TRAIN_CONFIG      training config [configs/synthetic-sharded.yaml]
    SHARDREC_NUM_SHARDS        --num-shards [the config's]
    SHARDREC_NUM_WORKERS       --num-workers [the config's]
    SHARDREC_TRAIN_ARGS        more ``python -m trainer train`` arguments (shell words) []
    SHARDREC_WAIT_S            train: how long to wait for the head's job API [300]
    SHARDREC_ARTIFACTS         serve: artifact directory [$SHARDREC_RUN_DIR/artifacts]
    SHARDREC_HOST              serve: interface [127.0.0.1]
    SHARDREC_PORT              serve: port [8000]
    RAY_AUTH_TOKEN             the Ray cluster's token (RAY_AUTH_MODE=token), or a file named by
                               RAY_AUTH_TOKEN_PATH: sent by the train role's job API calls and
                               the Ray healthchecks (``Authorization: Bearer``) []

``python docker/run.py --print ROLE`` prints the command line instead of running it. Standard
library only (the serve role takes its command line from ``service.launch``): healthchecks run
it every few seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger("shardrec.run")

SERVICE_ROLES = ("ray-head", "ray-worker", "train", "serve")
CHECK_ROLES = ("check-head", "check-worker", "check-api")
DEFAULTS = {
    "SHARDREC_RAY_HEAD": "127.0.0.1",
    "SHARDREC_RAY_PORT": "6379",
    "SHARDREC_DASHBOARD_HOST": "127.0.0.1",
    "SHARDREC_DASHBOARD_PORT": "8265",
    "SHARDREC_RUN_DIR": "runs/ray",
    "SHARDREC_TRAIN_CONFIG": "configs/synthetic-sharded.yaml",
    "SHARDREC_HOST": "127.0.0.1",
    "SHARDREC_PORT": "8000",
    "SHARDREC_WAIT_S": "300",
}
CHECK_TIMEOUT_S = 4.0
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def setting(env: Mapping[str, str], name: str) -> str:
    """``env[name]``, or its default when unset or empty."""
    return env.get(name) or DEFAULTS.get(name, "")


def _tool(name: str) -> str:
    """The ``ray`` of this interpreter's environment when there is one, else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def _node_flags(env: Mapping[str, str]) -> list[str]:
    flags = []
    if env.get("SHARDREC_RAY_CPUS"):
        flags.append(f"--num-cpus={env['SHARDREC_RAY_CPUS']}")
    if env.get("SHARDREC_RAY_GPUS"):
        flags.append(f"--num-gpus={env['SHARDREC_RAY_GPUS']}")
    return [*flags, "--disable-usage-stats", *shlex.split(env.get("SHARDREC_RAY_ARGS", ""))]


def dashboard_url(env: Mapping[str, str]) -> str:
    """The head's dashboard / job API as seen from another node."""
    head = setting(env, "SHARDREC_RAY_HEAD")
    return f"http://{head}:{setting(env, 'SHARDREC_DASHBOARD_PORT')}"


def artifacts_dir(env: Mapping[str, str]) -> Path:
    """Where ``train`` writes the artifacts and ``serve`` reads them."""
    if env.get("SHARDREC_ARTIFACTS"):
        return Path(env["SHARDREC_ARTIFACTS"]).absolute()
    return Path(setting(env, "SHARDREC_RUN_DIR")).absolute() / "artifacts"


def command(role: str, env: Mapping[str, str], submission_id: str | None = None) -> list[str]:
    """The command line of ``role`` under the settings ``env``."""
    if role == "ray-head":
        return [
            _tool("ray"),
            "start",
            "--head",
            "--block",
            f"--port={setting(env, 'SHARDREC_RAY_PORT')}",
            f"--dashboard-host={setting(env, 'SHARDREC_DASHBOARD_HOST')}",
            f"--dashboard-port={setting(env, 'SHARDREC_DASHBOARD_PORT')}",
            *_node_flags(env),
        ]
    if role == "ray-worker":
        head = f"{setting(env, 'SHARDREC_RAY_HEAD')}:{setting(env, 'SHARDREC_RAY_PORT')}"
        return [_tool("ray"), "start", "--block", f"--address={head}", *_node_flags(env)]
    if role == "train":
        train = [
            "python",
            "-m",
            "trainer",
            "train",
            "--config",
            setting(env, "SHARDREC_TRAIN_CONFIG"),
            "--out",  # absolute: the job runs in a copy of the working directory
            os.path.abspath(setting(env, "SHARDREC_RUN_DIR")),
            "--ray-address",
            "auto",
        ]
        for flag, name in (
            ("--num-shards", "SHARDREC_NUM_SHARDS"),
            ("--num-workers", "SHARDREC_NUM_WORKERS"),
        ):
            if env.get(name):
                train += [flag, env[name]]
        train += shlex.split(env.get("SHARDREC_TRAIN_ARGS", ""))
        submit = [
            _tool("ray"),
            "job",
            "submit",
            "--address",
            dashboard_url(env),
            "--working-dir",
            ".",
        ]
        if submission_id:
            submit += ["--submission-id", submission_id]
        return [*submit, "--", *train]
    if role == "serve":
        return _serve_argv()(
            artifacts_dir(env), setting(env, "SHARDREC_PORT"), host=setting(env, "SHARDREC_HOST")
        )
    raise ValueError(f"unknown role {role!r}; one of {SERVICE_ROLES + CHECK_ROLES}")


def _serve_argv():
    """`service.launch.serve_argv`, the one definition of the server's command line, from the
    checkout this file is in (the image's /app, or a source tree)."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from service.launch import serve_argv

    return serve_argv


def ray_auth_headers(env: Mapping[str, str]) -> dict[str, str]:
    """The ``Authorization`` header of Ray's token authentication, when a token is set."""
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if not token and env.get("RAY_AUTH_TOKEN_PATH"):
        token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


# --- healthchecks ----------------------------------------------------------------------------
def _local(host: str) -> str:
    """The address a healthcheck inside the container uses for a server bound to ``host``."""
    return "127.0.0.1" if host in WILDCARDS else host


def _get(
    url: str, timeout: float = CHECK_TIMEOUT_S, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=dict(headers or {})), timeout=timeout
        ) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def check(role: str, env: Mapping[str, str]) -> tuple[bool, str]:
    """Whether the service of a ``check-*`` role is healthy, and why (never raises)."""
    try:
        if role == "check-head":
            host = _local(setting(env, "SHARDREC_DASHBOARD_HOST"))
            status, body = _get(
                f"http://{host}:{setting(env, 'SHARDREC_DASHBOARD_PORT')}/api/version",
                headers=ray_auth_headers(env),
            )
            return status == 200, f"job API: {status} {body[:200]!r}"
        if role == "check-worker":
            status, body = _get(
                f"{dashboard_url(env)}/nodes?view=hostNameList", headers=ray_auth_headers(env)
            )
            if status != 200:
                return False, f"head answered {status}"
            data = json.loads(body)["data"]
            alive = data.get("hostNameList", data.get("host_name_list"))  # Ray camel-cases keys
            me = socket.gethostname()
            return me in alive, f"{me} {'is' if me in alive else 'is not'} in {sorted(alive)}"
        if role == "check-api":
            host = _local(setting(env, "SHARDREC_HOST"))
            status, body = _get(f"http://{host}:{setting(env, 'SHARDREC_PORT')}/readyz")
            return status == 200, f"readyz: {status} {body[:200]!r}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"{type(e).__name__}: {e}"
    raise ValueError(f"unknown check {role!r}; one of {CHECK_ROLES}")


# --- train -----------------------------------------------------------------------------------
def wait_for_head(env: Mapping[str, str]) -> bool:
    """Poll the head's job API until it answers or ``SHARDREC_WAIT_S`` seconds passed; False at
    once when it refuses our token (401/403: none set, or a different one)."""
    url = f"{dashboard_url(env)}/api/version"
    deadline = time.monotonic() + float(setting(env, "SHARDREC_WAIT_S"))
    headers = ray_auth_headers(env)
    while True:
        try:
            status, body = _get(url, headers=headers)
            if status == 200:
                return True
            if status in (401, 403):
                logger.error(
                    "the Ray job API refused the %s (%d %s): set RAY_AUTH_TOKEN to the "
                    "cluster's token",
                    "token" if headers else "request without a token",
                    status,
                    body[:200].decode("utf-8", "replace"),
                )
                return False
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(2)


def train(env: Mapping[str, str]) -> int:
    """Submit the training job, wait for it, check its artifacts; the exit status."""
    if not wait_for_head(env):
        logger.error("the Ray job API at %s did not answer", dashboard_url(env))
        return 1
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    submission_id = f"shardrec-train-{stamp}-{os.getpid()}"
    cmd = command("train", env, submission_id)
    logger.info("submitting %s", shlex.join(cmd))
    proc = subprocess.Popen(cmd)

    def stop(signum: int, _frame: object) -> None:
        # `ray job submit` leaves the job running when interrupted: stop it on the cluster too.
        logger.warning("signal %d: stopping job %s", signum, submission_id)
        proc.terminate()
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [_tool("ray"), "job", "stop", "--address", dashboard_url(env), submission_id],
                timeout=60,
                check=False,
            )
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = proc.wait()
    if code != 0:
        logger.error("training job %s failed (ray job submit exited %d)", submission_id, code)
        return code
    manifest = artifacts_dir(env) / "manifest.json"
    if not manifest.is_file():
        logger.error("job %s ended without artifacts: %s is missing", submission_id, manifest)
        return 1
    logger.info("job %s succeeded; artifacts in %s", submission_id, manifest.parent)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    show = bool(args) and args[0] == "--print"
    if show:
        args = args[1:]
    if len(args) != 1 or args[0] not in SERVICE_ROLES + CHECK_ROLES:
        print(__doc__, file=sys.stderr)
        return 2
    role, env = args[0], dict(os.environ)
    logging.basicConfig(level=logging.INFO, format="run.py %(levelname)s: %(message)s")
    if role in CHECK_ROLES:
        healthy, why = check(role, env)
        print(f"{role}: {'healthy' if healthy else 'unhealthy'}: {why}")
        return 0 if healthy else 1
    if show:
        print(shlex.join(command(role, env)))
        return 0
    if role == "train":
        return train(env)
    cmd = command(role, env)
    logger.info("%s: %s", role, shlex.join(cmd))
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)  # the server replaces this process: signals reach it directly
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
