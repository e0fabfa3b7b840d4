"""Sharded training on a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``:
one raylet and object store per node, as Ray's own tests do): shards and workers spread over
the nodes, a whole node lost mid-run while another joins, and a second node started with
``ray start --address``.

The head node has no CPUs (only the driver runs there); each other node has one. Nodes are
added and removed by the tests, so the module's cluster changes as it goes: tests that need a
given shape add the nodes they need.
"""

from __future__ import annotations

import logging
import math
import re
import subprocess
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from tests.procs import (  # noqa: E402
    BIN,
    S3_CREDENTIALS,
    MotoServer,
    Proc,
    RayHead,
    environ,
    fail,
    ray_node_args,
    short_temp_dir,
)
from tests.trainer.test_distributed import SYN, config  # noqa: E402
from trainer.data import DataConfig, load_dataset  # noqa: E402
from trainer.distributed.driver import train_distributed  # noqa: E402
from trainer.distributed.session import loopback_only  # noqa: E402
from trainer.storage import StoragePath  # noqa: E402

pytestmark = pytest.mark.slow

FAST_FAILURE = {  # a dead node is noticed in ~10 s (Ray: ~30 s), robust to a loaded machine
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_failure_threshold": 10,
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (0 CPUs, the driver's node) and two nodes of 1 CPU, 127.0.0.1 only; the S3
    credentials are in the environment of every node (and of this process)."""
    if ray.is_initialized():
        ray.shutdown()
    with environ(S3_CREDENTIALS), loopback_only():
        c = Cluster(
            initialize_head=True,
            connect=True,
            shutdown_at_exit=False,
            head_node_args={
                "num_cpus": 0,
                "include_dashboard": False,
                "_system_config": FAST_FAILURE,
            },
        )
        try:
            for _ in range(2):
                c.add_node(num_cpus=1)
            c.wait_for_nodes()
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


@pytest.fixture(scope="module")
def dataset():
    return load_dataset(DataConfig(synthetic=SYN))


def cluster_config(out_dir, **overrides):
    """Two shards and two workers, one of each per node (STRICT_SPREAD), checkpoints every
    10 steps; fractional CPUs so that a lost node's actors fit on the nodes left."""
    dist = {
        "num_shards": 2,
        "num_workers": 2,
        "shard_cpus": 0.1,
        "worker_cpus": 0.4,
        "placement": "STRICT_SPREAD",
        "shard_checkpoint_every": 10,
        "restart_timeout_s": 120.0,
        **overrides.pop("distributed", {}),
    }
    return config(out_dir, **dist).model_copy(update=overrides)


def alive_cpu_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0}


def node_lines(records, what: str) -> list[list[str]]:
    """The node id prefixes of every "<run>: <what> on nodes a, b" log line, in order."""
    pattern = re.compile(rf": {what} on nodes (.+)$")
    found = [pattern.search(r.getMessage()) for r in records]
    return [m.group(1).split(", ") for m in found if m]


@pytest.fixture(scope="module")
def undisturbed(cluster, dataset, tmp_path_factory):
    """The reference: the same run on the two nodes, nothing killed (local storage)."""
    out = tmp_path_factory.mktemp("undisturbed")
    return train_distributed(cluster_config(out), dataset=dataset)


def test_shards_and_workers_spread_over_nodes(cluster, dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trainer")
    cfg = cluster_config(tmp_path, epochs=1)
    result = train_distributed(cfg, dataset=dataset)
    nodes = {n[:8] for n in alive_cpu_nodes()}
    shards, workers = node_lines(caplog.records, "shards")[0], node_lines(caplog.records, "workers")
    assert len(set(shards)) == 2 and set(shards) <= nodes, (shards, nodes)
    assert len(set(workers[0])) == 2 and set(workers[0]) <= nodes, (workers, nodes)
    assert result.recoveries == 0
    assert result.global_step == math.ceil(len(dataset.train_positions) / cfg.batch_size)


def test_a_group_that_cannot_be_placed_says_so(cluster, dataset, tmp_path):
    cfg = cluster_config(tmp_path, distributed={"num_shards": 3, "restart_timeout_s": 3.0})
    with pytest.raises(ValueError, match=r"could not place 3 actors .* strategy STRICT_SPREAD"):
        train_distributed(cfg, dataset=dataset)  # 3 shards, one per node, on 2 nodes
    assert not [n for n in ray.util.list_named_actors() if n.startswith("shardrec-")]


class Background(threading.Thread):
    """``fn(*args, **kwargs)`` on a daemon thread (a failed test does not wait for it)."""

    def __init__(self, fn, *args, **kwargs) -> None:
        super().__init__(daemon=True)
        self.call = (fn, args, kwargs)
        self.value, self.error = None, None

    def run(self) -> None:
        fn, args, kwargs = self.call
        try:
            self.value = fn(*args, **kwargs)
        except BaseException as e:  # re-raised by result()
            self.error = e

    def done(self) -> bool:
        return not self.is_alive()

    def result(self, timeout: float | None = None):
        self.join(timeout)
        if self.is_alive():
            fail(f"the run did not end within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.value


def wait_for_step(run_prefix_before: set[str], step: int, future, timeout: float = 300):
    """The new run's name and its shard 0's handle once shard 0 has applied ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if future.done():
            future.result()
            fail(f"the run ended before step {step}")
        names = [n for n in ray.util.list_named_actors() if n not in run_prefix_before]
        shard0 = [n for n in names if n.endswith("-shard-0")]
        if shard0:
            run = shard0[0][: -len("-shard-0")]
            info = ray.get(ray.get_actor(shard0[0]).info.remote())
            if info["applied"] >= step:
                return run
        time.sleep(0.05)
    fail(f"shard 0 did not reach step {step} in {timeout:.0f} s")


def test_node_lost_mid_run_rolls_back_and_a_new_node_is_used(
    cluster, dataset, undisturbed, tmp_path, caplog
):
    """A node added at step ~20 and then a whole node (a shard and a worker) removed: the run
    completes from the last common checkpoint, on the new node after the restart, with the
    undisturbed run's HR@50; the shards' and workers' files are only in S3 (no directory is
    shared between the nodes: the driver's out_dir gets none of them)."""
    caplog.set_level(logging.INFO, logger="trainer")
    moto = MotoServer(tmp_path / "moto")
    try:
        storage = moto.uri("multinode/run")
        out = tmp_path / "driver"
        cfg = cluster_config(out, storage=storage)
        before = set(ray.util.list_named_actors())
        future = Background(train_distributed, cfg, dataset=dataset)
        future.start()
        run = wait_for_step(before, 20, future)  # of 86 (2 epochs of 43 steps)
        old_nodes = alive_cpu_nodes()
        new_node = cluster.add_node(num_cpus=1)
        shard1 = ray.get(ray.get_actor(f"{run}-shard-1").info.remote())
        victim = next(n for n in cluster.worker_nodes if n.node_id == shard1["node"])
        cluster.remove_node(victim, allow_graceful=False)
        result = future.result(timeout=600)
        assert old_nodes - alive_cpu_nodes() == {victim.node_id}

        assert result.recoveries >= 1
        messages = [r.getMessage() for r in caplog.records if r.name.startswith("trainer")]
        redo = [re.search(r"redoing steps (\d+)-(\d+)", m) for m in messages]
        redo = [(int(m[1]), int(m[2])) for m in redo if m]
        common = redo[0][0] - 1 if redo else None  # a checkpoint's step: every 10, epoch end
        assert common is not None and common >= 20 and (common % 10 == 0 or common == 43), messages
        restarted = [m for m in messages if re.match(r"shard 1 restarted, restored step", m)]
        assert restarted, messages
        workers_after = node_lines(caplog.records, "workers")[-1]
        assert new_node.node_id[:8] in workers_after, (workers_after, new_node.node_id)
        shards_after = node_lines(caplog.records, "shards")[-1]
        assert victim.node_id[:8] not in shards_after and len(set(shards_after)) == 2

        hr, ref = result.curves[-1]["HR@50"], undisturbed.curves[-1]["HR@50"]
        logging.getLogger(__name__).info("HR@50 %.4f, undisturbed %.4f", hr, ref)
        assert hr == pytest.approx(ref, abs=0.02)
        assert result.global_step == undisturbed.global_step
        for got, want in zip(result.curves, undisturbed.curves):  # sync: redone exactly
            assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-4)

        remote = StoragePath.of(storage).files()
        for name in ("checkpoint.pt", "best.pt", "shards/shard-0.pt", "shards/shard-1.pt"):
            assert name in remote, remote
        assert not (out / "shards").exists() and not (out / "checkpoint.pt").exists()
    finally:
        moto.stop()


def count_alive_nodes(env: dict[str, str], gcs: str) -> int:
    """Live nodes of the cluster at ``gcs``, asked by a fresh driver process."""
    code = f"import ray; ray.init(address={gcs!r}); print(sum(n['Alive'] for n in ray.nodes()))"
    probe = subprocess.run(
        [str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    return int(probe.stdout.strip().splitlines()[-1])


def test_ray_start_address_second_node(tmp_path):
    """A real second raylet joining a ``ray start --head`` with ``ray start --address``, both on
    127.0.0.1. Skips, quoting Ray, where this machine refuses it."""
    head = RayHead(cpus=1).wait_ready()
    temp = short_temp_dir("srnode-")
    argv = [
        str(BIN / "ray"),
        "start",
        f"--address={head.gcs_address}",
        "--block",
        "--num-cpus=1",
        "--disable-usage-stats",
        *ray_node_args(temp),
    ]
    node = Proc(argv, tmp_path / "node.log", env=head.env, cwd=tmp_path, sweep=temp, grace=30)
    try:
        deadline = time.monotonic() + 120
        alive = 1
        while node.poll() is None and time.monotonic() < deadline:
            alive = count_alive_nodes(head.env, head.gcs_address)
            if alive == 2:
                break
            time.sleep(1)
        if node.poll() is not None:
            said = re.sub(r"\x1b\[[0-9;]*m", "", node.output(2000)).strip()  # no colours
            pytest.skip(
                f"`ray start --address` refused on this machine (exit {node.poll()}): {said}"
            )
        assert alive == 2, node.output()
    finally:
        node.stop()
        head.stop()
