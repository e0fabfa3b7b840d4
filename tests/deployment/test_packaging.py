"""Packaging: the extras (a serving install pulls no Ray, pyarrow or matplotlib), the
``shardrec`` console script, and the Makefile's torch install (the CPU index by default).

Whether ``import service`` and loading a model import none of the training-side modules is
tests/service/test_imports.py; what a real ``pip install '.[serve]'`` resolves to is checked
with ``pip install --dry-run --report`` (docs/deployment.md, "Install facts").
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.deployment.compose import REPO

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
TRAINING_ONLY = {"ray", "pyarrow", "matplotlib"}


def names(requirements: list[str]) -> set[str]:
    """The distribution names of PEP 508 requirement strings, normalised."""
    out = set()
    for req in requirements:
        name = re.match(r"[A-Za-z0-9._-]+", req)[0]
        out.add(re.sub(r"[-_.]+", "-", name).lower())
    return out


def extra(name: str) -> set[str]:
    """The direct requirements of an extra, its ``shardrec[...]`` references expanded."""
    out = set()
    for req in PROJECT["optional-dependencies"][name]:
        m = re.fullmatch(r"shardrec\[([\w,-]+)\]", req)
        if m:
            for sub in m[1].split(","):
                out |= extra(sub)
        else:
            out |= names([req])
    return out


def test_a_serving_install_pulls_no_training_dependencies():
    core = names(PROJECT["dependencies"])
    assert not core & TRAINING_ONLY, core
    assert not extra("serve") & TRAINING_ONLY, extra("serve")
    assert extra("train") >= TRAINING_ONLY
    assert {"fastapi", "uvicorn", "faiss-cpu"} <= extra("serve")
    assert extra("all") == extra("train") | extra("serve")
    assert extra("all") <= extra("dev")  # the test suite needs both sides
    assert "torch" in core  # the model is torch on both sides


def test_lower_bounds_that_the_code_needs():
    """The bounds `make lowest` raised (the older versions fail: see pyproject.toml)."""
    reqs = {
        r.split(">=")[0].split("[")[0]: r.split(">=")[1].split(",")[0]
        for group in [PROJECT["dependencies"], *PROJECT["optional-dependencies"].values()]
        for r in group
        if ">=" in r
    }
    assert tuple(map(int, reqs["ray"].split("."))) >= (2, 20)  # ActorUnavailableError
    # the 4.x API, and the fuzz test passes
    assert tuple(map(int, reqs["schemathesis"].split("."))) >= (4, 29)
    assert tuple(map(int, reqs["pydantic-settings"].split("."))) >= (2, 15)
    assert tuple(map(int, reqs["starlette"].split("."))) >= (0, 48)  # HTTP_422_..._CONTENT


def shardrec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shardrec", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_console_script_entry_point():
    assert PROJECT["scripts"] == {"shardrec": "shardrec.cli:main"}
    usage = shardrec("--help")
    assert usage.returncode == 0
    for command in ("train", "evaluate", "index", "serve"):
        assert f"  {command} " in usage.stdout, usage.stdout
    nothing = shardrec()
    assert nothing.returncode == 2 and "usage: shardrec" in nothing.stderr
    bogus = shardrec("fit")
    assert bogus.returncode == 2 and "unknown command 'fit'" in bogus.stderr


@pytest.mark.parametrize(
    ("command", "prog"),
    [("train", "python -m trainer train"), ("serve", "python -m service serve")],
)
def test_commands_are_the_package_command_lines(command, prog):
    done = shardrec(command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {prog}"), done.stdout[:200]


BLOCK = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):  # as in an install without the extra
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Missing())
from shardrec.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize(
    ("blocked", "argv", "extra_name"),
    [
        ({"pyarrow", "ray", "matplotlib"}, ["train", "epochs=1"], "train"),
        ({"fastapi", "uvicorn", "faiss"}, ["serve", "--artifacts", "nowhere"], "serve"),
    ],
    ids=["train-without-train-extra", "serve-without-serve-extra"],
)
def test_a_missing_extra_is_named(blocked, argv, extra_name, tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", BLOCK.format(blocked=blocked, argv=argv)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"pip install 'shardrec[{extra_name}]'" in done.stderr, done.stderr


def test_make_installs_torch_from_the_cpu_index_by_default():
    """The Makefile's torch: the pin, a local wheel first, else the CPU index (never PyPI's
    CUDA build by default)."""
    plan = subprocess.run(
        ["make", "-n", "-B", "install", "VENV=/nonexistent-venv"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if plan.returncode != 0 and "command not found" in plan.stderr:
        pytest.skip("no make")
    assert plan.returncode == 0, plan.stderr
    torch = [line for line in plan.stdout.splitlines() if "torch==" in line]
    assert torch, plan.stdout
    assert "--no-deps --no-index torch==2.13.0" in torch[0]
    assert torch[0].endswith("--index-url https://download.pytorch.org/whl/cpu"), torch[0]
    steps = plan.stdout.splitlines()
    project = next(i for i, line in enumerate(steps) if 'install -q -e ".[' in line)
    assert steps.index(torch[0]) < project, "torch must be installed before the project"
