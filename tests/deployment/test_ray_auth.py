"""Ray token authentication, on by default: the embedded Ray of `trainer.distributed.session`,
a ``ray start --head`` cluster as the compose stack runs it (RAY_AUTH_MODE=token and a token),
and docker/run.py's job client and healthchecks against it (the token as a bearer header; a
missing or wrong token is refused, and said so). The compose files' part (the token required)
is in test_compose.py; the whole stack with a token in test_topology.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deployment import compose
from tests.procs import RayHead, short_temp_dir

REPO = compose.REPO
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="needs /proc")


run = compose.run_py()

EMBEDDED = """
import json, sys
from ray._raylet import AuthenticationMode, get_authentication_mode
from trainer.distributed.session import local_ray

with local_ray(1):
    mode = get_authentication_mode()
print(json.dumps({"token_mode": mode == AuthenticationMode.TOKEN}))
"""


@pytest.mark.slow
def test_the_embedded_ray_has_token_auth_on_by_default(tmp_path):
    """No RAY_AUTH_MODE set: the local helper's Ray runs with token authentication, its token
    generated into ~/.ray/auth_token (here a temporary HOME)."""
    pytest.importorskip("ray")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    ray_tmp = short_temp_dir("srauth-")  # Ray's socket paths: 107 bytes at most
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO), RAY_TMPDIR=ray_tmp)
    try:
        done = subprocess.run(
            [sys.executable, "-c", EMBEDDED],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"token_mode": True}
    token = tmp_path / ".ray" / "auth_token"
    assert token.is_file() and len(token.read_text().strip()) >= 32


def test_run_py_sends_the_token(tmp_path):
    assert run.ray_auth_headers({}) == {}
    assert run.ray_auth_headers({"RAY_AUTH_TOKEN": " abc \n"}) == {"Authorization": "Bearer abc"}
    path = tmp_path / "token"
    path.write_text("from-a-file\n")
    assert run.ray_auth_headers({"RAY_AUTH_TOKEN_PATH": str(path)}) == {
        "Authorization": "Bearer from-a-file"
    }


@pytest.fixture(scope="module")
def head():
    pytest.importorskip("ray")
    head = RayHead(env={**os.environ, "RAY_AUTH_TOKEN": compose.TOKEN}, cpus=1)
    try:
        yield head.wait_ready()
    finally:
        head.stop()


def client_env(head: RayHead, token: str | None) -> dict[str, str]:
    port = head.address.rsplit(":", 1)[1]
    env = {"SHARDREC_DASHBOARD_PORT": port, "SHARDREC_WAIT_S": "30"}
    return {**env, "RAY_AUTH_TOKEN": token} if token else env


@pytest.mark.slow
@pytest.mark.parametrize(
    ("token", "healthy"),
    [(compose.TOKEN, True), (None, False), ("not-the-token", False)],
    ids=["its-token", "no-token", "another-token"],
)
def test_the_head_requires_its_token(head, token, healthy, caplog):
    assert head.env["RAY_AUTH_MODE"] == "token"
    env = client_env(head, token)
    ok, why = run.check("check-head", env)
    assert ok is healthy, why
    assert ("401" in why or "403" in why) is not healthy, why
    # The trainer's wait for the job API gives up at once on a refusal, saying why.
    assert run.wait_for_head(env) is healthy
    if not healthy:
        assert "set RAY_AUTH_TOKEN to the cluster's token" in caplog.text


@pytest.mark.slow
def test_ray_job_cli_needs_the_token(head):
    """What docker/run.py's train role runs: ``ray job list`` with and without the token."""
    ray = str(Path(sys.executable).parent / "ray")
    argv = [ray, "job", "list", "--address", head.address]
    without = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN"}
    refused = subprocess.run(argv, env=without, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower()
    allowed = subprocess.run(argv, env=head.env, capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
