"""Every command of README.md's ```bash blocks, run for real.

The README's commands are parsed out of it and classified by `KINDS` (a table of regexes); a
command of no kind fails `test_every_readme_command_is_classified`. Each kind has a test below
that runs the command as written, with only what a test needs substituted:

* ``python`` / ``ray`` are this virtual environment's (the job's ``python`` is found on a
  ``PATH`` that starts with it);
* the README's paths under the checkout (``--out runs/small``, ``--artifacts
  runs/small/artifacts``) become paths under a temporary directory, and a train line without
  ``--out`` gets one there, so nothing is written into the checkout;
* training lines get the tiny overrides `TINY` (inserted before the README's own overrides, so
  the README's values still win); the MovieLens line only ``epochs=1`` and is skipped without
  the data;
* ports: ``serve --port 8000``, the curls' ``localhost:8000`` and the Ray head's ports become
  free ports on 127.0.0.1; curl also gets ``-w`` to report the status code;
* ``docker compose ... up --build -d`` becomes ``docker compose ... config --quiet`` with the
  Compose binary of tests/deployment/compose.py (no Docker engine on CI).

The two ``make`` lines are classified but not run here (`KINDS` says why). The README's ``ray
job submit`` is the suite's one real job submission to a ``ray start --head`` cluster. Every
process runs in its own session and is stopped by pid (tests/procs.py).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from tests import procs
from tests.deployment import compose
from tests.service.live import wait_ready
from tests.tiny import TINY_RUN

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs /proc")

REPO = procs.REPO
README = REPO / "README.md"
BIN = procs.BIN
HEAD_CPUS = 2  # of the Ray head the README's job is submitted to

TINY = TINY_RUN  # the tiny synthetic run of the other end-to-end tests
TINY_REAL_DATA = ["epochs=1", "progress=false", "num_threads=1"]  # MovieLens: its own size

# Every command line of the README's bash blocks matches exactly one of these (`shlex.join`
# of the line without its comment). A new command: add a kind here and a test below.
KINDS: dict[str, str] = {
    "make-test": r"make test",  # not run here: it is what CI runs, this file included
    "make-demo": r"make demo",  # not run here: tests/deployment/test_demo_client.py runs its client
    "train": r"python -m trainer train( .*)?",
    "evaluate": r"python -m trainer evaluate --artifacts \S+",
    "ray-job-submit": r"ray job submit .* -- python -m trainer train .*",
    "service-index": r"python -m service index --artifacts \S+( .*)?",
    "service-serve": r"python -m service serve --artifacts \S+( .*)?",
    "curl": r"curl .*\blocalhost:\d+.*",
    "compose-up": r"docker compose( -f \S+)+ up --build -d",
    "pip-install": r"pip install \S+( --index-url \S+)?",  # checked against the project files
}
TABLE = re.compile(r"^\| (model|popularity) \|.*\|$", re.M)


# --- the README ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    lineno: int  # of README.md, 1-based
    line: str  # as written, comment included
    argv: tuple[str, ...]

    @property
    def text(self) -> str:
        return shlex.join(self.argv)

    @property
    def id(self) -> str:
        return f"README.md:{self.lineno}"


def bash_commands(text: str) -> list[Command]:
    """The command lines of the ```bash blocks (comments dropped, ``\\`` continuations joined)."""
    commands: list[Command] = []
    in_bash = False
    pending, start = "", 0
    for lineno, line in enumerate(text.splitlines(), 1):
        fence = line.strip()
        if fence.startswith("```"):
            in_bash = fence == "```bash" and not in_bash
            continue
        if not in_bash:
            continue
        if not pending:
            start = lineno
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full, pending = pending + line, ""
        try:
            argv = shlex.split(full, comments=True)
        except ValueError as e:
            raise ValueError(f"README.md:{start}: {e}: {full.strip()}") from e
        if argv:
            commands.append(Command(start, full.strip(), tuple(argv)))
    return commands


COMMANDS = bash_commands(README.read_text(encoding="utf-8"))


def kinds_of(command: Command) -> list[str]:
    return [kind for kind, rx in KINDS.items() if re.fullmatch(rx, command.text)]


def commands_of(kind: str) -> list[Command]:
    return [c for c in COMMANDS if kinds_of(c) == [kind]]


def params(kind: str, marks=None) -> list:
    """``commands_of(kind)`` as pytest params (``marks(command)`` gives a command's marks)."""
    return [pytest.param(c, id=c.id, marks=marks(c) if marks else ()) for c in commands_of(kind)]


def flag(argv, name: str) -> str | None:
    """The value of ``--name v`` or ``--name=v`` (the last one), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def with_flag(argv, name: str, value: str) -> list[str]:
    """``argv`` with ``--name``'s value(s) replaced by ``value`` (appended when absent)."""
    out, found, skip = [], False, False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == name and i + 1 < len(argv):
            out += [name, value]
            found = skip = True
        elif arg.startswith(name + "="):
            out.append(f"{name}={value}")
            found = True
        else:
            out.append(arg)
    return out if found else [*out, name, value]


def is_override(arg: str) -> bool:
    return re.match(r"[A-Za-z_][\w.]*=", arg) is not None


def in_checkout(path: str) -> Path:
    """A README path (relative, or under ``$PWD``, the checkout) relative to the checkout."""
    expanded = Path(re.sub(r"\$\{?PWD\}?", str(REPO), path))
    if expanded.is_absolute():
        assert expanded.is_relative_to(REPO), f"{path}: outside the checkout"
        return expanded.relative_to(REPO)
    return expanded


def prose_head() -> list[str] | None:
    """The README's ``ray start --head ...`` (in backticks in the prose), if any."""
    m = re.search(r"`(ray start --head[^`]*)`", README.read_text(encoding="utf-8"))
    return shlex.split(m[1]) if m else None


# --- running ---------------------------------------------------------------------------------
@dataclass
class Result:
    argv: list[str]
    returncode: int | None  # None: timed out (and killed)
    stdout: str
    stderr: str

    def explain(self) -> str:
        return (
            f"$ {shlex.join(self.argv)}\nexit {self.returncode}\n--- stdout\n"
            f"{self.stdout[-6000:]}\n--- stderr\n{self.stderr[-6000:]}"
        )


def base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SHARDREC_", "RAY_ADDRESS", "COMPOSE_"))
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def run(
    argv: list[str],
    logs: Path,
    name: str,
    timeout: float,
    env: dict[str, str] | None = None,
    sweep: str | None = None,
) -> Result:
    """``argv`` in the checkout, in its own session, to completion (stopped at ``timeout``)."""
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    code = procs.run(argv, out, timeout, env=env or base_env(), err_log=err, sweep=sweep)
    return Result(argv, code, out.read_text(errors="replace"), err.read_text(errors="replace"))


# --- training lines --------------------------------------------------------------------------
class Runs:
    """The README's run directories, under a temporary directory; each train line runs once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.done: dict[int, tuple[Result, Path]] = {}

    def local(self, path: str) -> Path:
        return self.root / in_checkout(path)

    def train_argv(self, argv: list[str], python: str) -> tuple[list[str], Path]:
        """A README ``python -m trainer train ...`` as run here, and its run directory."""
        assert argv[:4] == ["python", "-m", "trainer", "train"], argv
        args = list(argv[4:])
        data_dir = flag(args, "--data-dir")
        tiny = TINY_REAL_DATA if data_dir else TINY
        # The README's overrides are one run (argparse's nargs="*"): the tiny ones go first.
        first = next((i for i, a in enumerate(args) if is_override(a)), len(args))
        args[first:first] = tiny
        out = flag(args, "--out")
        if out is None:
            config = flag(args, "--config")
            out = f"runs/default-{Path(config).stem if config else 'run'}"
        run_dir = self.local(out)
        # A refit's earlier run (``epochs_from=runs/select``) is that README run's directory here.
        args = [
            f"epochs_from={self.local(a.split('=', 1)[1])}" if a.startswith("epochs_from=") else a
            for a in args
        ]
        return [python, "-m", "trainer", "train", *with_flag(args, "--out", str(run_dir))], run_dir

    def train(self, command: Command) -> tuple[Result, Path]:
        """Runs a README train line once (skips when its ``--data-dir`` is absent)."""
        if command.lineno in self.done:
            return self.done[command.lineno]
        data_dir = flag(command.argv, "--data-dir")
        if data_dir and not (REPO / data_dir).is_dir():
            pytest.skip(f"{data_dir} (research data) is not beside the checkout")
        for arg in command.argv:
            if arg.startswith("epochs_from="):  # train the README run it refits first
                self.artifacts(str(in_checkout(arg.split("=", 1)[1]) / "artifacts"))
        argv, run_dir = self.train_argv(list(command.argv), sys.executable)
        env, sweep = base_env(), None
        if flag(command.argv, "--num-shards") or flag(command.argv, "--num-workers"):
            # The embedded Ray's processes under a private temp dir, to sweep them at the end.
            sweep = procs.short_temp_dir("srrm-")
            env["RAY_TMPDIR"] = sweep
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        try:
            result = run(
                argv, self.logs, f"train-{command.lineno}", timeout=300, env=env, sweep=sweep
            )
        finally:
            if sweep:
                shutil.rmtree(sweep, ignore_errors=True)
        self.done[command.lineno] = (result, run_dir)
        return result, run_dir

    def artifacts(self, readme_path: str) -> Path:
        """The artifacts of the README train line whose ``--out`` is ``readme_path``'s run."""
        for command in commands_of("train"):
            out = flag(command.argv, "--out")
            if out and in_checkout(out) / "artifacts" == in_checkout(readme_path):
                result, run_dir = self.train(command)
                assert result.returncode == 0, result.explain()
                return run_dir / "artifacts"
        pytest.fail(
            f"no README train line writes {readme_path} (with --out {Path(readme_path).parent})"
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("readme"))


def config_value(config: dict, key: str):
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def check_trained(result: Result, run_dir: Path, readme_args) -> dict:
    """A finished train line: the test table printed, artifacts written with the README's
    overrides and flags in their config; the manifest."""
    assert result.returncode == 0, result.explain()
    manifest = json.loads((run_dir / "artifacts" / "manifest.json").read_text())
    config = manifest["config"]
    if config["data"]["holdout"] == "test":
        assert "| model | excluded |" in result.stdout, result.explain()
        assert "| popularity | excluded |" in result.stdout, result.explain()
    else:  # a refit on held-out data: says there are no test metrics
        holdout = config["data"]["holdout"]
        assert f"no test metrics: data.holdout={holdout}" in result.stdout, result.explain()
        assert manifest["holdout"] == holdout and "model" not in manifest["metrics"]
    assert f"artifacts: {run_dir / 'artifacts'}" in result.stdout, result.explain()
    for arg in readme_args:
        if arg.startswith("epochs_from="):  # a path, moved under the test's directory
            assert manifest["metrics"]["epochs"] >= 1
        elif is_override(arg):
            key, value = arg.split("=", 1)
            assert config_value(config, key) == yaml.safe_load(value), (key, config)
    for name, key in (
        ("--num-shards", "distributed.num_shards"),
        ("--num-workers", "distributed.num_workers"),
    ):
        if flag(readme_args, name) is not None:
            assert config_value(config, key) == int(flag(readme_args, name)), (key, config)
    return manifest


# --- the classification ----------------------------------------------------------------------
def test_every_readme_command_is_classified():
    assert COMMANDS, "no command found in README.md's ```bash blocks"
    unclassified = [
        f"{c.id}: `{c.line}` matches {kinds_of(c) or 'no kind'}"
        for c in COMMANDS
        if len(kinds_of(c)) != 1
    ]
    assert not unclassified, (
        "README commands of no kind, or of several: add each to tests/test_readme.py (a regex "
        "in KINDS and a test that runs it):\n" + "\n".join(unclassified)
    )


# --- training --------------------------------------------------------------------------------
def train_marks(command: Command) -> list:
    marks = []
    if flag(command.argv, "--data-dir"):
        marks.append(pytest.mark.data)
    if flag(command.argv, "--num-shards") or flag(command.argv, "--num-workers"):
        marks.append(pytest.mark.slow)
    return marks


@pytest.mark.parametrize("command", params("train", train_marks))
def test_train(command, runs):
    result, run_dir = runs.train(command)
    check_trained(result, run_dir, command.argv[4:])


def check_evaluates(argv: list[str], trained: Result, logs: Path, name: str) -> None:
    """``argv``, a ``trainer evaluate``, reads the artifacts and prints the table that training
    printed (``trained``)."""
    result = run(argv, logs, name, timeout=240)
    assert result.returncode == 0, result.explain()
    assert TABLE.search(result.stdout), result.explain()
    train_rows = sorted(set(m.group(0) for m in TABLE.finditer(trained.stdout)))
    eval_rows = sorted(set(m.group(0) for m in TABLE.finditer(result.stdout)))
    assert eval_rows == train_rows, (eval_rows, train_rows)


@pytest.mark.parametrize("command", params("evaluate"))
def test_evaluate_recomputes_the_train_table(command, runs):
    artifacts = runs.artifacts(flag(command.argv, "--artifacts"))
    argv = [sys.executable, *with_flag(command.argv[1:], "--artifacts", str(artifacts))]
    trained = next(r for r, d in runs.done.values() if d / "artifacts" == artifacts)
    check_evaluates(argv, trained, runs.logs, f"evaluate-{command.lineno}")


# --- Ray ---------------------------------------------------------------------------------------
@pytest.fixture
def ray_head():
    """The README's ``ray start --head ...`` (its ports made free ones), on 127.0.0.1 with
    its own temp dir and `HEAD_CPUS` CPUs; yields (the head, the README's head line)."""
    pytest.importorskip("ray")
    readme_head = prose_head() or ["ray", "start", "--head", "--port", "6379"]
    head = procs.RayHead(readme_head, env=base_env(), cpus=HEAD_CPUS)
    try:
        yield head.wait_ready(), readme_head
    finally:
        head.stop()


PLAN = re.compile(r"(\d+) shards x ([\d.]+) CPUs, (\d+) workers x ([\d.]+) CPUs")


@pytest.mark.slow
@pytest.mark.parametrize("command", params("ray-job-submit"))
def test_ray_job_submit(command, ray_head, runs):
    """The README's submit line against its head: the job succeeds, sized to the cluster's
    CPUs, writes its shards, and ``trainer evaluate`` reads its artifacts."""
    head, readme_head = ray_head
    argv = list(command.argv)
    split = argv.index("--")
    submit, job = argv[:split], argv[split + 1 :]
    readme_address = flag(submit, "--address")
    m = re.fullmatch(r"http://(127\.0\.0\.1|localhost):(\d+)", readme_address or "")
    assert m, f"--address {readme_address}: expected the head's dashboard on this machine"
    head_dash = flag(readme_head, "--dashboard-port") or "8265"
    assert m[2] == head_dash, f"the submit goes to port {m[2]}, the head's dashboard is {head_dash}"
    submit = [str(BIN / "ray"), *with_flag(submit[1:], "--address", head.address)]
    job, run_dir = runs.train_argv(job, "python")  # the job's python: PATH starts with ours
    result = run([*submit, "--", *job], runs.logs, "ray-job-submit", timeout=360, env=head.env)
    assert result.returncode == 0, result.explain()
    assert "succeeded" in result.stdout + result.stderr, result.explain()
    manifest = check_trained(result, run_dir, argv[split + 5 :])
    distributed = manifest["config"]["distributed"]
    plan = PLAN.search(result.stdout + result.stderr)
    assert plan, result.explain()
    shards, workers = int(plan[1]), int(plan[3])
    assert (shards, workers) == (distributed["num_shards"], distributed["num_workers"]), plan[0]
    used = shards * float(plan[2]) + workers * float(plan[4])
    assert 0 < used <= HEAD_CPUS, f"{plan[0]}: the plan must fit the head's {HEAD_CPUS} CPUs"
    assert sorted(p.name for p in (run_dir / "shards").glob("shard-*.pt")) == [
        f"shard-{i}.pt" for i in range(shards)
    ]
    evaluate = [sys.executable, "-m", "trainer", "evaluate", "--artifacts"]
    check_evaluates([*evaluate, str(run_dir / "artifacts")], result, runs.logs, "ray-job-evaluate")


@pytest.mark.parametrize("command", params("ray-job-submit"))
def test_ray_job_writes_its_run_where_the_reader_finds_it(command):
    """A job runs in a copy of ``--working-dir`` that Ray unpacks under its session directory:
    a relative ``--out`` lands there (and goes with the session), not in the checkout."""
    job = command.argv[command.argv.index("--") + 1 :]
    out = flag(job, "--out")
    absolute = out is not None and Path(re.sub(r"\$\{?PWD\}?", "/", out)).is_absolute()
    assert absolute, (
        f"{command.id}: `--out {out}` is relative to the job's unpacked working dir "
        "(<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*/), not to the "
        'checkout: give an absolute path such as `--out "$PWD/runs/cluster"`'
    )


# --- the service -----------------------------------------------------------------------------
@dataclass
class Served:
    url: str
    readme_port: str
    artifacts: Path
    index_results: dict[int, Result]


@pytest.fixture(scope="module")
def served(runs):
    """The README's index lines run, then its serve line on a free port until the module ends."""
    serves = commands_of("service-serve")
    assert len(serves) == 1, "one `python -m service serve` line is expected (the curls' server)"
    serve = serves[0]
    readme_artifacts = flag(serve.argv, "--artifacts")
    artifacts = runs.artifacts(readme_artifacts)
    index_results = {}
    for command in commands_of("service-index"):
        assert flag(command.argv, "--artifacts") == readme_artifacts, command.line
        argv = [sys.executable, *with_flag(command.argv[1:], "--artifacts", str(artifacts))]
        index_results[command.lineno] = run(argv, runs.logs, f"index-{command.lineno}", timeout=240)
    port = procs.free_port()
    argv = with_flag(serve.argv[1:], "--artifacts", str(artifacts))
    argv = [sys.executable, *with_flag(argv, "--port", str(port))]
    url = f"http://127.0.0.1:{port}"
    with procs.Proc(argv, runs.logs / "serve.log", env=base_env(), name="serve") as proc:
        wait_ready(url, timeout=120, proc=proc)
        yield Served(url, flag(serve.argv, "--port") or "8000", artifacts, index_results)


@pytest.mark.parametrize("command", params("service-index"))
def test_service_index(command, served):
    result = served.index_results[command.lineno]
    assert result.returncode == 0, result.explain()
    kind = flag(command.argv, "--kind") or "hnsw"
    saved = served.artifacts / f"index-{kind}"
    assert f"saved to {saved}" in result.stdout, result.explain()
    assert (saved / "index.json").is_file()
    for name, key in (("--m", "hnsw_m"), ("--ef-search", "ef_search"), ("--nlist", "nlist")):
        if flag(command.argv, name) is not None:
            assert f"'{key}': {flag(command.argv, name)}" in result.stdout, result.explain()


@pytest.mark.parametrize("command", params("service-serve"))
def test_service_serve_loads_the_readme_index(command, served):
    model = httpx.get(f"{served.url}/v1/model", timeout=30, trust_env=False).json()
    assert model["artifacts"] == str(served.artifacts), model
    indexed = {flag(c.argv, "--kind") or "hnsw" for c in commands_of("service-index")}
    if model["index"]["kind"] in indexed:  # `serve` loads the index `index` saved
        assert model["index"]["source"] == "loaded", model
    if "OpenAPI at /docs" in command.line:
        docs = httpx.get(f"{served.url}/docs", timeout=30, trust_env=False)
        assert docs.status_code == 200 and "openapi" in docs.text.lower(), docs.text[:500]


def curl_request(argv) -> tuple[str, str, dict[str, str], str | None]:
    """(method, url, headers, body) of a curl command line (the flags the README uses)."""
    method, url, headers, body = None, None, {}, None
    args = list(argv[1:])
    while args:
        arg = args.pop(0)
        if arg in ("-s", "--silent", "-S", "--show-error"):
            continue
        if arg in ("-H", "--header"):
            name, value = args.pop(0).split(":", 1)
            headers[name.strip().lower()] = value.strip()
        elif arg in ("-d", "--data", "--data-raw"):
            body = args.pop(0)
        elif arg in ("-X", "--request"):
            method = args.pop(0)
        elif arg.startswith("-"):
            raise AssertionError(f"curl flag {arg}: teach tests/test_readme.py.curl_request it")
        else:
            assert url is None, f"two URLs in {argv}"
            url = arg if "://" in arg else f"http://{arg}"
    assert url, argv
    return method or ("POST" if body is not None else "GET"), url, headers, body


def localise(arg: str, readme_port: str, url: str) -> str:
    def sub(m: re.Match) -> str:
        assert m[1] == readme_port, f"curl to port {m[1]}; the README serves on {readme_port}"
        return url.removeprefix("http://")

    return re.sub(r"(?<![\w.])localhost:(\d+)", sub, arg)


def ids_in(value, found: dict[str, set[str]], key: str | None = None) -> None:
    """The user and item ids a request names: ``user_id``, ``history`` / ``exclude`` /
    ``items`` (item ids), recursively."""
    if isinstance(value, dict):
        for k, v in value.items():
            ids_in(v, found, k)
    elif isinstance(value, list):
        for v in value:
            ids_in(v, found, key)
    elif isinstance(value, str) and key == "user_id":
        found["users"].add(value)
    elif isinstance(value, str) and key in ("history", "exclude", "items"):
        found["items"].add(value)


def readme_ids() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {"users": set(), "items": set()}
    for command in commands_of("curl"):
        _, url, _, body = curl_request(command.argv)
        path = urlsplit(url).path
        found["users"].update(re.findall(r"/users/([^/]+)", path))
        found["items"].update(re.findall(r"/items/([^/]+)", path))
        if body is not None:
            ids_in(json.loads(body), found)
    return found


def test_readme_ids_exist_in_the_served_artifacts(served):
    ids = readme_ids()
    assert ids["users"] and ids["items"], ids
    with (served.artifacts / "users.csv").open(newline="") as f:
        users = {row["original_id"] for row in csv.DictReader(f)}
    with (served.artifacts / "items.csv").open(newline="") as f:
        items = {row["original_id"] for row in csv.DictReader(f)}
    assert ids["users"] <= users, f"README user ids not in the tiny model: {ids['users'] - users}"
    assert ids["items"] <= items, f"README item ids not in the tiny model: {ids['items'] - items}"


def send(argv: list[str]) -> tuple[int, str, str]:
    """(status, content type, body) of a curl command line: curl itself, else httpx."""
    if shutil.which("curl"):
        done = subprocess.run(
            [*argv, "-S", "--max-time", "30", "-w", "\n%{http_code} %{content_type}"],
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        body, _, tail = done.stdout.rpartition("\n")
        code, _, ctype = tail.partition(" ")
        return int(code), ctype, body
    method, url, headers, body = curl_request(argv)
    r = httpx.request(method, url, headers=headers, content=body, timeout=30, trust_env=False)
    return r.status_code, r.headers.get("content-type", ""), r.text


def check_answer(answer) -> None:
    """Known ids: no unknown items, model (not popularity) answers for known users."""
    if isinstance(answer, list):
        for a in answer:
            check_answer(a)
    if not isinstance(answer, dict):
        return
    assert answer.get("unknown_items", []) == [], answer
    if answer.get("user_id") is not None and "source" in answer:
        assert answer["source"] == "model", answer
    if answer.get("status") is not None:
        assert answer["status"] in ("ok", "ready"), answer
    for value in answer.values():
        if isinstance(value, (dict, list)):
            check_answer(value)


@pytest.mark.parametrize("command", params("curl"))
def test_curl(command, served):
    argv = [localise(a, served.readme_port, served.url) for a in command.argv]
    status, ctype, body = send(argv)
    assert 200 <= status < 300, (command.line, status, body)
    if urlsplit(curl_request(argv)[1]).path == "/metrics":
        assert ctype.startswith("text/plain"), ctype
        assert "# TYPE shardrec_" in body, body[:2000]
    else:
        assert ctype.startswith("application/json"), (ctype, body)
        check_answer(json.loads(body))


# --- docker compose --------------------------------------------------------------------------
@pytest.mark.parametrize("command", params("pip-install"))
def test_pip_install_lines_name_the_projects_pins_and_extras(command):
    """Not run (that is the install itself): the torch line is the Makefile's pin from its CPU
    index, the others are the checkout with extras that pyproject.toml defines."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+")
    args = list(command.argv[2:])
    if args[0].startswith("torch=="):
        make = (REPO / "Makefile").read_text()
        version = re.search(r"^TORCH_VERSION \?= (\S+)$", make, re.M)[1]
        index = re.search(r"^TORCH_INDEX \?= (\S+)$", make, re.M)[1]
        assert args == [f"torch=={version}", "--index-url", index], command.line
        return
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    m = re.fullmatch(r"\.\[([\w,-]+)\]", args[0])
    assert m and len(args) == 1, f"{command.id}: expected `pip install '.[extra,...]'`"
    assert set(m[1].split(",")) <= set(extras["optional-dependencies"]), command.line


@pytest.mark.parametrize("command", params("compose-up"))
def test_compose_files_and_flags_are_valid(command):
    argv = list(command.argv)
    up = argv.index("up")
    assert argv[up:] == ["up", "--build", "-d"], argv
    files = [REPO / f for f in argv[2:up] if f != "-f"]
    done = compose.compose(files, "config", "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
