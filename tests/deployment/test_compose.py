"""The container deployment's files: the compose files as Docker Compose itself merges and
validates them, docker/run.py's command lines, the Dockerfile and the build context.

The compose tests ask the real Compose v2 binary (tests/deployment/compose.py), and skip where
it cannot run (not Linux x86_64). The build context is what Docker's Python SDK (docker-py,
``docker.utils.build``, a port of moby's pattern matcher that its ``build`` uses to pack the
context) keeps of the checkout under .dockerignore: no Docker engine runs here, and BuildKit's
own matcher is reachable only through one.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deployment import compose
from tests.procs import free_port

REPO = compose.REPO
SERVICES = {"ray-head", "ray-worker", "trainer", "api"}


run = compose.run_py()


@pytest.fixture(scope="module")
def gpu():
    compose.binary()  # or skip, saying why
    return compose.config()


@pytest.fixture(scope="module")
def cpu():
    compose.binary()
    return compose.config(cpu=True)


def devices(service: dict) -> list:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


# --- Compose's merged configuration ----------------------------------------------------------------
@pytest.mark.parametrize(
    "files",
    [[compose.BASE], [compose.BASE, compose.CPU], [compose.BASE, compose.CPU, compose.HOST]],
    ids=["gpu", "cpu", "cpu-host"],
)
def test_compose_accepts_the_files(files):
    done = compose.compose(files, "config", "--quiet")
    assert done.returncode == 0 and "WARN" not in done.stderr, done.stderr


BROKEN = {  # the GPU file with one mistake each, and what Compose says about it
    "unknown-condition": (
        "condition: service_completed_successfully",
        "condition: service_done",
        "services.api.depends_on.trainer.condition value must be one of",
    ),
    "undefined-dependency": (
        "    depends_on:\n      trainer:",
        "    depends_on:\n      trainers:",
        'depends on undefined service "trainers"',
    ),
    "undefined-anchor": ("<<: *ray-env", "<<: *ray-environment", "ray-environment"),
}


@pytest.mark.parametrize("mistake", BROKEN)
def test_compose_refuses_a_broken_file(mistake, tmp_path):
    good, bad, message = BROKEN[mistake]
    text = compose.BASE.read_text()
    assert good in text, f"{mistake}: the compose file changed, update BROKEN"
    broken = tmp_path / "docker" / "docker-compose.yml"
    broken.parent.mkdir()
    broken.write_text(text.replace(good, bad))
    done = compose.compose([broken], "config", "--quiet")
    assert done.returncode != 0, f"Compose accepted a broken file:\n{done.stdout}{done.stderr}"
    assert message in done.stderr, done.stderr


def test_services_present(gpu, cpu):
    assert set(gpu["services"]) == SERVICES
    assert set(cpu["services"]) == SERVICES
    assert gpu["name"] == "shardrec"


def test_gpu_reservation_on_workers_only(gpu):
    [device] = devices(gpu["services"]["ray-worker"])
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device["count"] == 1  # one GPU per worker container: scale workers to add GPUs
    assert [n for n, s in gpu["services"].items() if devices(s)] == ["ray-worker"]
    assert gpu["services"]["ray-head"]["environment"]["SHARDREC_RAY_GPUS"] == "0"


def test_cpu_override_has_no_gpu(cpu):
    assert "nvidia" not in compose.CPU.read_text()
    assert not any(devices(s) for s in cpu["services"].values())  # `!reset` removed it
    for name, service in cpu["services"].items():
        assert service["build"]["args"]["TORCH_VARIANT"] == "cpu", name
        assert service["image"] == "shardrec:cpu", name


def test_one_image_per_variant(gpu, cpu):
    for cfg, variant in ((gpu, "cu128"), (cpu, "cpu")):
        images = {s["image"] for s in cfg["services"].values()}
        builds = {json.dumps(s["build"], sort_keys=True) for s in cfg["services"].values()}
        assert len(images) == 1 and len(builds) == 1
        [build] = [s["build"] for s in cfg["services"].values()][:1]
        assert build["args"]["TORCH_VARIANT"] == variant
        assert Path(build["context"]).resolve() == REPO
        assert (REPO / build["dockerfile"]).is_file()
    assert {s["image"] for s in gpu["services"].values()} != {
        s["image"] for s in cpu["services"].values()
    }


def test_workers_scale(gpu):
    worker = gpu["services"]["ray-worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale ray-worker=N
    assert "hostname" not in worker  # check-worker finds each replica by its own host name


def test_commands_come_from_run_py(gpu):
    roles = {}
    for name, service in gpu["services"].items():
        command = service["command"]
        assert command[:2] == ["python", "docker/run.py"], name
        assert service.get("entrypoint") is None, name  # the image's, i.e. none
        roles[name] = command[2]
    assert roles == {
        "ray-head": "ray-head",
        "ray-worker": "ray-worker",
        "trainer": "train",
        "api": "serve",
    }
    assert set(roles.values()) == set(run.SERVICE_ROLES)


def test_healthchecks(gpu):
    services = gpu["services"]
    for name, role in (
        ("ray-head", "check-head"),
        ("ray-worker", "check-worker"),
        ("api", "check-api"),
    ):
        check = services[name]["healthcheck"]
        assert check["test"] == ["CMD", "python", "docker/run.py", role], name
        assert role in run.CHECK_ROLES
        assert {"interval", "timeout", "retries", "start_period"} <= set(check), name
    assert "healthcheck" not in services["trainer"]  # one-shot: judged by its exit status


def test_depends_on_conditions(gpu):
    services = gpu["services"]
    conditions = {
        name: {dep: c["condition"] for dep, c in s.get("depends_on", {}).items()}
        for name, s in services.items()
    }
    assert conditions == {
        "ray-head": {},
        "ray-worker": {"ray-head": "service_healthy"},
        "trainer": {"ray-head": "service_healthy", "ray-worker": "service_healthy"},
        "api": {"trainer": "service_completed_successfully"},
    }
    for deps in conditions.values():
        for dep, condition in deps.items():
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], dep
    assert services["trainer"]["restart"] == "no"


def test_shared_runs_volume(gpu):
    assert "runs" in gpu["volumes"]
    for name in SERVICES:  # shards (workers), the driver (head), the check (trainer), the API
        mounts = [(v["type"], v["source"], v["target"]) for v in gpu["services"][name]["volumes"]]
        assert ("volume", "runs", "/runs") in mounts, name
    env = {name: s["environment"] for name, s in gpu["services"].items()}
    run_dir = env["trainer"]["SHARDREC_RUN_DIR"]
    assert (
        run_dir.startswith("/runs/") and env["api"]["SHARDREC_ARTIFACTS"] == f"{run_dir}/artifacts"
    )
    for name in ("ray-head", "ray-worker"):
        assert env[name]["SHARDREC_RUN_DIR"] == run_dir
    renamed = compose.config(env={"SHARDREC_RUN_NAME": "ml-100k"})["services"]
    assert renamed["api"]["environment"]["SHARDREC_ARTIFACTS"] == "/runs/ml-100k/artifacts"
    assert renamed["trainer"]["environment"]["SHARDREC_RUN_DIR"] == "/runs/ml-100k"


def published(cfg) -> dict[str, list[tuple[str, str, int]]]:
    return {
        name: [(p["host_ip"], p["published"], p["target"]) for p in service["ports"]]
        for name, service in cfg["services"].items()
        if "ports" in service
    }


def test_published_ports_are_loopback(gpu):
    assert published(gpu) == {
        "ray-head": [("127.0.0.1", "8265", 8265)],
        "api": [("127.0.0.1", "8000", 8000)],
    }
    moved = compose.config(env={"SHARDREC_API_PUBLISH": "9000"})
    assert published(moved)["api"] == [("127.0.0.1", "9000", 8000)]


def test_compose_env_gives_the_documented_command_lines(gpu):
    """The contract: the exact head, worker, job and API command lines in the containers."""
    env = {n: s["environment"] for n, s in gpu["services"].items()}
    head = run.command("ray-head", env["ray-head"])
    assert head[1:] == [
        "start",
        "--head",
        "--block",
        "--port=6379",
        "--dashboard-host=0.0.0.0",
        "--dashboard-port=8265",
        "--num-gpus=0",
        "--disable-usage-stats",
    ]
    worker = run.command("ray-worker", env["ray-worker"])
    assert worker[1:] == ["start", "--block", "--address=ray-head:6379", "--disable-usage-stats"]
    train = run.command("train", env["trainer"])
    assert train[1:] == shlex.split(
        "job submit --address http://ray-head:8265 --working-dir . -- python -m trainer train "
        "--config configs/synthetic-sharded.yaml --out /runs/synthetic-sharded "
        "--ray-address auto --num-shards 4 --num-workers 1"
    )
    assert (REPO / env["trainer"]["SHARDREC_TRAIN_CONFIG"]).is_file()
    serve = run.command("serve", env["api"])
    assert serve[1:] == shlex.split(
        "-m service serve --artifacts /runs/synthetic-sharded/artifacts --host 0.0.0.0 --port 8000"
    )


def test_ray_token_auth_is_on_and_the_token_required(gpu, cpu):
    for cfg in (gpu, cpu):
        for name in ("ray-head", "ray-worker", "trainer"):
            env = cfg["services"][name]["environment"]
            assert env["RAY_AUTH_MODE"] == "token", name
            assert env["RAY_AUTH_TOKEN"] == compose.TOKEN, name
        assert "RAY_AUTH_TOKEN" not in cfg["services"]["api"]["environment"]  # no Ray there
    for token in ("", None):
        env = {k: v for k, v in compose.clean_env().items() if k != "RAY_AUTH_TOKEN"}
        if token is not None:
            env["RAY_AUTH_TOKEN"] = token
        done = subprocess.run(
            [str(compose.binary()), "-f", str(compose.BASE), "config", "--quiet"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0, "Compose accepted the stack without a Ray token"
        assert "set RAY_AUTH_TOKEN" in done.stderr, done.stderr


@pytest.fixture(scope="module")
def host():
    compose.binary()
    return compose.config(cpu=True, host=True)


def test_host_network_override(host):
    """Every container on the host's network, every server on 127.0.0.1, no network created
    (no bridge may be), one Ray node: the worker is behind a profile and nothing waits for it."""
    services = host["services"]
    assert set(services) == SERVICES - {"ray-worker"}  # profile multi-node: not started
    assert "networks" not in host or not host["networks"], host.get("networks")
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert not service.get("ports") and not service.get("expose"), name
        assert "networks" not in service, name
    assert set(services["trainer"]["depends_on"]) == {"ray-head"}
    env = {n: s["environment"] for n, s in services.items()}
    for name in ("ray-head", "trainer"):
        assert env[name]["SHARDREC_RAY_HEAD"] == "127.0.0.1", name
        assert env[name]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0", name
    assert env["ray-head"]["SHARDREC_DASHBOARD_HOST"] == "127.0.0.1"
    assert env["api"]["SHARDREC_HOST"] == "127.0.0.1"
    head = run.command("ray-head", env["ray-head"])
    assert "--node-ip-address=127.0.0.1" in head and "--dashboard-host=127.0.0.1" in head
    assert run.command("serve", env["api"])[-4:] == ["--host", "127.0.0.1", "--port", "8000"]


def test_host_network_ports_are_settings():
    moved = compose.config(
        cpu=True,
        host=True,
        env={
            "SHARDREC_RAY_PORT": "16379",
            "SHARDREC_DASHBOARD_PORT": "18265",
            "SHARDREC_API_PORT": "18000",
            "SHARDREC_HEAD_RAY_ARGS": "--ray-client-server-port=10101",
        },
    )["services"]
    head = run.command("ray-head", moved["ray-head"]["environment"])
    assert {"--port=16379", "--dashboard-port=18265", "--ray-client-server-port=10101"} <= set(head)
    assert run.dashboard_url(moved["trainer"]["environment"]) == "http://127.0.0.1:18265"
    assert moved["api"]["environment"]["SHARDREC_PORT"] == "18000"


# --- docker/run.py ----------------------------------------------------------------------------------
def test_run_py_settings():
    env = {
        "SHARDREC_RAY_ARGS": "--temp-dir=/tmp/x --num-cpus=3",
        "SHARDREC_TRAIN_ARGS": "epochs=1 'model.hidden=[32, 16]'",
        "SHARDREC_NUM_WORKERS": "2",
    }
    assert run.command("ray-head", env)[-2:] == ["--temp-dir=/tmp/x", "--num-cpus=3"]
    train = run.command("train", env, submission_id="job-1")
    assert train[train.index("--submission-id") + 1] == "job-1"
    assert train[-4:] == ["--num-workers", "2", "epochs=1", "model.hidden=[32, 16]"]
    assert "--num-shards" not in train  # unset: the config's value
    assert run.artifacts_dir({}) == Path("runs/ray/artifacts").absolute()
    assert run.artifacts_dir({"SHARDREC_ARTIFACTS": "/a"}) == Path("/a")
    assert run.command("train", {})[run.command("train", {}).index("--out") + 1] == str(
        Path("runs/ray").absolute()
    )
    with pytest.raises(ValueError, match="unknown role"):
        run.command("nope", {})


def test_run_py_cli(tmp_path):
    python = sys.executable
    shown = subprocess.run(
        [python, "docker/run.py", "--print", "serve"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "SHARDREC_PORT": "9"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.strip().endswith(
        f"--artifacts {REPO}/runs/ray/artifacts --host 127.0.0.1 --port 9"
    )
    usage = subprocess.run(
        [python, "docker/run.py", "bogus"], cwd=REPO, capture_output=True, text=True
    )
    assert usage.returncode == 2 and "Roles:" in usage.stderr
    # A healthcheck of a server that is not there: unhealthy (exit 1), never a traceback.
    free = free_port()
    down = subprocess.run(
        [python, "docker/run.py", "check-api"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "SHARDREC_PORT": str(free)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 1 and down.stdout.startswith("check-api: unhealthy"), down


class FakeSubmit:
    """Stands in for ``ray job submit``: exits with ``code``, optionally writing artifacts."""

    def __init__(self, code: int, write: Path | None = None) -> None:
        self.code, self.write, self.calls = code, write, []

    def __call__(self, cmd):
        self.calls.append(cmd)
        if self.write is not None:
            self.write.mkdir(parents=True)
            (self.write / "manifest.json").write_text("{}")
        return self

    def wait(self):
        return self.code


@pytest.mark.parametrize(
    ("code", "writes", "expected"),
    [(0, True, 0), (1, False, 1), (0, False, 1)],
    ids=["succeeded", "job-failed", "no-artifacts"],
)
def test_train_exit_status_is_the_job_result(monkeypatch, tmp_path, code, writes, expected):
    import signal

    env = {"SHARDREC_RUN_DIR": str(tmp_path / "run")}
    fake = FakeSubmit(code, tmp_path / "run" / "artifacts" if writes else None)
    monkeypatch.setattr(run, "wait_for_head", lambda env: True)
    monkeypatch.setattr(run.subprocess, "Popen", fake)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert run.train(env) == expected
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    [cmd] = fake.calls
    assert cmd[cmd.index("--submission-id") + 1].startswith("shardrec-train-")


def test_sigterm_stops_the_job_on_the_cluster(monkeypatch, tmp_path):
    import os
    import signal

    class Interrupted(FakeSubmit):
        terminated = False

        def wait(self):
            os.kill(os.getpid(), signal.SIGTERM)  # `docker compose stop` while the job runs
            return 0

        def terminate(self):
            self.terminated = True

    fake, stops = Interrupted(0), []
    monkeypatch.setattr(run, "wait_for_head", lambda env: True)
    monkeypatch.setattr(run.subprocess, "Popen", fake)
    monkeypatch.setattr(run.subprocess, "run", lambda cmd, **kw: stops.append(cmd))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(SystemExit) as exit_:
            run.train({"SHARDREC_RUN_DIR": str(tmp_path)})
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert exit_.value.code == 128 + signal.SIGTERM and fake.terminated
    [cmd] = fake.calls
    submission = cmd[cmd.index("--submission-id") + 1]
    assert stops == [
        [run._tool("ray"), "job", "stop", "--address", run.dashboard_url({}), submission]
    ]


def test_train_gives_up_without_a_head():
    port = free_port()
    env = {"SHARDREC_DASHBOARD_PORT": str(port), "SHARDREC_WAIT_S": "0"}
    assert run.train(env) == 1


# --- Dockerfile -----------------------------------------------------------------------------------
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_multi_stage_with_torch_variant():
    steps = _instructions()
    stages = [rest for word, rest in steps if word == "FROM"]
    assert len(stages) >= 2 and stages[-1].endswith("AS runtime")
    assert ("ARG", "TORCH_VARIANT=cpu") in steps
    runs = [rest for word, rest in steps if word == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "torch==" in r)
    assert '--index-url "${TORCH_INDEX_URL}/${TORCH_VARIANT}"' in runs[torch]
    project = next(i for i, r in enumerate(runs) if re.search(r"pip install .*--constraint", r))
    assert torch < project, "torch must be installed before the project"
    assert any("nvidia-" in r for r in runs[project:])  # the CPU image refuses CUDA packages


def test_dockerfile_build_options():
    """Offline and proxied builds: local torch wheels, an extra CA bundle, the base image; no
    frontend fetched from a registry; the torch pin read as `name==version` even for a wheel
    installed from a file."""
    assert not DOCKERFILE.startswith("# syntax=")
    steps = _instructions()
    assert ("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm") in steps
    assert ("ARG", "TORCH_FIND_LINKS=") in steps
    runs = [rest for word, rest in steps if word == "RUN"]
    torch = next(r for r in runs if "torch==" in r)
    assert (
        '"torch==${TORCH_VERSION}" --no-deps --no-index --find-links "${TORCH_FIND_LINKS}"' in torch
    )
    assert "--mount=type=bind,source=docker/wheels,target=/wheels" in torch
    assert (REPO / "docker" / "wheels").is_dir()
    for r in (r for r in runs if "pip install" in r):  # every pip step can use the CA bundle
        assert "--mount=type=secret,id=ca_bundle" in r and "PIP_CERT=/run/secrets/ca_bundle" in r
    assert "pip freeze" not in DOCKERFILE.replace(
        "# `pip list --format=freeze`, not `pip freeze`", ""
    )
    assert sum("pip list --format=freeze" in r for r in runs) >= 2


def test_dockerfile_runs_as_a_plain_user():
    steps = _instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    users = [rest for word, rest in steps[last_from:] if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(word == "CMD" and "docker/run.py" in rest for word, rest in steps)


# --- build context --------------------------------------------------------------------------------
def dockerignore() -> list[str]:
    """The patterns of .dockerignore, read as docker-py's ``APIClient.build`` reads them."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


@pytest.fixture(scope="module")
def matcher():
    build = pytest.importorskip("docker.utils.build", reason="docker-py: pip install -e '.[dev]'")
    return build.PatternMatcher(dockerignore())


@pytest.fixture(scope="module")
def context() -> set[str]:
    """The checkout's paths (files and folders) that a build sends, per docker-py."""
    build = pytest.importorskip("docker.utils.build", reason="docker-py: pip install -e '.[dev]'")
    return build.exclude_paths(str(REPO), dockerignore(), dockerfile="docker/Dockerfile")


def test_dockerignore_keeps_environments_runs_and_data_out(matcher):
    for path in (
        ".venv/bin/python",
        "runs/ml-100k/artifacts/manifest.json",
        "data/ml-100k/u.data",
        ".git/HEAD",
        ".pytest_cache/v/cache",
        ".ruff_cache/x",
        ".hypothesis/examples/x",
        "shardrec.egg-info/PKG-INFO",
        "tests/service/test_api.py",
        "benchmarks/serve/__main__.py",
        "trainer/__pycache__/config.cpython-311.pyc",
        "configs/ml-100k/u.data.csv",
        "service/checkpoint.pt",
        "docker/docker-compose.yml",
    ):
        assert matcher.matches(path), f"{path} would reach the build context"
    for path in (
        "pyproject.toml",
        "README.md",
        "configs/synthetic-sharded.yaml",
        "sampler/losses.py",
        "trainer/data/synthetic.py",
        "service/routers/health.py",
        "docker/run.py",
        "docker/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        "shardrec/cli.py",
    ):
        assert not matcher.matches(path), f"{path} would be left out of the build context"


def test_every_copied_path_is_in_the_context(context):
    sources = []
    for word, rest in _instructions():
        if word == "COPY" and "--from=" not in rest:
            args = [a for a in rest.split() if not a.startswith("--")]
            sources += args[:-1]
    assert sources, "no COPY found"
    for src in sources:
        assert (REPO / src).exists(), src
        assert src.strip("/") in context, f"COPY {src}: not in the build context"
    # Every project file the repository tracks in a copied package reaches the image.
    listed = subprocess.run(
        ["git", "ls-files", "sampler", "trainer", "service", "configs"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    tracked = listed.stdout.split()
    assert tracked
    assert not set(tracked) - context, sorted(set(tracked) - context)
