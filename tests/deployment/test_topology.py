"""The compose topology as local processes on 127.0.0.1 (no Docker engine needed).

The services, their commands, environments, healthchecks and ``depends_on`` conditions are what
Docker Compose makes of docker/docker-compose.yml (``config --format json``), run as they are,
with only what a container network provides replaced for the loopback: service host names and
``0.0.0.0`` become 127.0.0.1, the container ports (``expose``) become free ports, the ``/runs``
volume becomes a temporary directory, and ``python`` is this interpreter. Test-only additions,
all through the variables docker/run.py documents: the Ray head gets its own ``--temp-dir``,
127.0.0.1 as its address, free ports for its agents and 2 CPUs; the training job gets the tiny
synthetic overrides.

``ray-worker`` is the one service not started: a second node must reach the head by a network
address, and Ray keeps every process on 127.0.0.1 only when multi-node is off
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which refuses ``ray start --address``). The head offers
the CPUs instead; the worker's command line is checked in test_compose.py and its healthcheck
is run here against the head.

The trainer service is the compose file's ``ray job submit`` (docker/run.py train); what a
submitted training job itself produces (its table, shards, plan, artifacts that ``trainer
evaluate`` reads) is checked once, in tests/test_readme.py's run of the README's submit line.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.deployment import compose
from tests.procs import NotYet, Proc, free_ports, ray_node_args, short_temp_dir, wait_until
from tests.tiny import TINY_RUN

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="needs /proc")]

REPO = compose.REPO
BIN = Path(sys.executable).parent
STARTED = ("ray-head", "trainer", "api")  # in the compose file's dependency order
NOT_STARTED = ("ray-worker",)
TINY = " ".join([*TINY_RUN, "eval_ks=[10,50]", "monitor=HR@50"])
TRAIN_TIMEOUT_S = 240


class Loopback:
    """Maps what a compose network provides onto this machine."""

    def __init__(self, cfg: dict[str, Any], runs: Path) -> None:
        self.hosts = set(cfg["services"])
        ports = sorted({str(p) for s in cfg["services"].values() for p in s.get("expose", [])})
        self.ports = dict(zip(ports, map(str, free_ports(len(ports)))))
        self.volumes = {"/runs": str(runs)}

    def value(self, value: str, hosts: bool = True) -> str:
        if (hosts and value in self.hosts) or value == "0.0.0.0":
            return "127.0.0.1"
        if value in self.ports:
            return self.ports[value]
        for target, local in self.volumes.items():
            if value == target or value.startswith(target + "/"):
                return local + value[len(target) :]
        return value

    def argv(self, argv: list[str]) -> list[str]:
        # Not host names: a command's role argument is named like its service.
        if argv[:1] == ["CMD"]:  # a healthcheck's exec form
            return ["CMD", *self.argv(argv[1:])]
        mapped = [self.value(a, hosts=False) for a in argv]
        return [sys.executable, *mapped[1:]] if mapped[:1] == ["python"] else mapped

    def env(self, service: dict[str, Any]) -> dict[str, str]:
        return {k: self.value(v or "") for k, v in service.get("environment", {}).items()}


def base_env() -> dict[str, str]:
    env = compose.clean_env()
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the Ray job's `python` too
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray process on 127.0.0.1
    env["PYTHONUNBUFFERED"] = "1"
    return env


def healthcheck(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    assert argv[0] == "CMD", argv  # exec form: the same argv Docker runs
    return subprocess.run(
        argv[1:], env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def wait_healthy(name: str, proc: Proc, argv: list[str], env: dict[str, str], limit: float):
    def healthy() -> None:
        result = healthcheck(argv, env)
        if result.returncode != 0:
            raise NotYet(result.stdout.strip() or result.stderr.strip())

    wait_until(healthy, f"{name} healthy", limit, proc, interval=1.0)


def get(url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def topology(request, tmp_path):
    """Starts the compose services in order; yields their configs, envs and processes."""
    pytest.importorskip("ray")
    compose.binary()  # or skip, saying why
    cfg = compose.config()
    services = cfg["services"]
    assert set(services) == {*STARTED, *NOT_STARTED}, "a service was added: run it here too"
    runs = tmp_path / "runs"
    runs.mkdir()
    loop = Loopback(cfg, runs)
    temp_dir = short_temp_dir("srdep-")
    request.addfinalizer(lambda: shutil.rmtree(temp_dir, ignore_errors=True))
    extra = {
        "ray-head": {
            "SHARDREC_RAY_CPUS": "2",
            "SHARDREC_RAY_ARGS": " ".join(ray_node_args(temp_dir)),
        },
        "trainer": {"SHARDREC_TRAIN_ARGS": TINY},
    }
    envs = {
        name: {**base_env(), **loop.env(services[name]), **extra.get(name, {})} for name in services
    }
    procs: dict[str, Proc] = {}
    stop_order: list[Proc] = []

    def finalise() -> None:
        for proc in reversed(stop_order):
            proc.stop()

    request.addfinalizer(finalise)

    for name in STARTED:
        service = services[name]
        for dep, cond in (service.get("depends_on") or {}).items():
            if dep in NOT_STARTED:
                continue
            if cond["condition"] == "service_healthy":
                check = loop.argv(services[dep]["healthcheck"]["test"])
                wait_healthy(dep, procs[dep], check, envs[dep], limit=120)
            elif cond["condition"] == "service_completed_successfully":
                try:
                    code = procs[dep].wait(timeout=TRAIN_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{dep} still running after {TRAIN_TIMEOUT_S}s")
                assert code == 0, f"{dep} exited with {code}:\n{procs[dep].output()}"
            else:
                pytest.fail(f"{name}: unexpected depends_on condition {cond}")
        proc = Proc(
            loop.argv(service["command"]),
            tmp_path / f"{name}.log",
            env=envs[name],
            sweep=temp_dir if name == "ray-head" else None,
            grace=40 if name == "ray-head" else 20,
            name=name,
        )
        procs[name] = proc
        stop_order.append(proc)
    api = services["api"]
    wait_healthy("api", procs["api"], loop.argv(api["healthcheck"]["test"]), envs["api"], 120)
    return {"services": services, "envs": envs, "procs": procs, "loop": loop, "runs": runs}


@pytest.mark.timeout(600)
def test_compose_topology_on_loopback(topology):
    services, envs, procs, loop = (topology[k] for k in ("services", "envs", "procs", "loop"))

    # trainer: `ray job submit` ran the job on the head and exited 0 with the artifacts written
    # where the compose file's api service reads them.
    train_log = procs["trainer"].output(20000)
    assert "ray job submit" in train_log and "--ray-address auto" in train_log, train_log
    assert "succeeded" in train_log, train_log
    assert "4 shards" in train_log, train_log  # SHARDREC_NUM_SHARDS of the compose file
    artifacts = Path(envs["api"]["SHARDREC_ARTIFACTS"])
    assert artifacts.parent.parent == topology["runs"]
    assert Path(envs["trainer"]["SHARDREC_RUN_DIR"]) / "artifacts" == artifacts
    manifest = json.loads((artifacts / "manifest.json").read_text())
    assert sorted(p.name for p in (artifacts.parent / "shards").glob("shard-*.pt")) == [
        f"shard-{i}.pt" for i in range(4)
    ]

    # ray-worker's healthcheck asks the head for its alive nodes (here: the head's host).
    check = healthcheck(
        loop.argv(services["ray-worker"]["healthcheck"]["test"]), envs["ray-worker"]
    )
    assert check.returncode == 0, check.stdout + check.stderr

    # api: serves the job's model.
    url = f"http://127.0.0.1:{envs['api']['SHARDREC_PORT']}"
    status, model = get(f"{url}/v1/model")
    assert status == 200, model
    assert model["model_version"] == manifest["model_version"]
    with (artifacts / "users.csv").open(newline="") as f:
        user = next(csv.DictReader(f))["original_id"]
    status, rec = get(f"{url}/v1/recommend", {"user_id": user, "k": 10})
    assert status == 200, rec
    assert rec["source"] == "model" and len(rec["items"]) == 10, rec
    with (artifacts / "items.csv").open(newline="") as f:
        popular = next(r for r in csv.DictReader(f) if r["index"] == "0")["original_id"]
    status, sim = get(f"{url}/v1/items/{urllib.parse.quote(popular, safe='')}/similar?k=5")
    assert status == 200, sim
    assert len(sim["items"]) == 5 and popular not in {i["item_id"] for i in sim["items"]}, sim
