"""The sharded store over real Ray shard actors (an embedded Ray on 127.0.0.1): pipelined pulls
refreshed by the pushes they must see, and pushes that are not lost when their worker stops."""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from trainer.config import ModelConfig, OptimConfig  # noqa: E402
from trainer.distributed.session import local_ray  # noqa: E402
from trainer.embeddings import LocalStore  # noqa: E402
from trainer.shards.actor import RayShards, create_shard_actors  # noqa: E402
from trainer.shards.client import ShardedStore  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = ModelConfig(embedding_dim=8, hidden=[16], init_std=0.1)
OPTIM = OptimConfig(embedding_optimizer="adam", embedding_lr=0.05)
N, STEPS = 300, 12


@pytest.fixture(scope="module")
def embedded_ray():
    with local_ray(2, log_to_driver=False):
        yield


@pytest.fixture
def actors(embedded_ray, tmp_path):
    shards = create_shard_actors(2, N, MODEL, OPTIM, "mod", 0, 1, "sync", tmp_path, 0.1, 0)
    ray.get([s.restore.remote(1, "ckpt", 0) for s in shards])
    yield shards
    for s in shards:
        ray.kill(s, no_restart=True)


def _steps(seed: int):
    """Per step: unique ids [n] and gradients of the output and bias tables."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        ids = torch.unique(torch.randint(0, N, (60,), generator=gen))
        grads = {"output": torch.randn(len(ids), 8, generator=gen)}
        grads["bias"] = torch.randn(len(ids), generator=gen)
        out.append((ids, grads))
    return out


def test_pipelined_pulls_over_ray_see_every_earlier_push(actors):
    """Depth 3: each step's rows are pulled two steps early and refreshed; every pull equals
    the in-process store's after all earlier pushes, exactly."""
    store = ShardedStore(RayShards(actors), N, "mod", token=1)
    ref = LocalStore(N, MODEL, OPTIM, 0)
    steps = _steps(0)
    store.prefetch(steps[0][0], 1)
    store.prefetch(steps[1][0], 2)
    for t, (ids, grads) in enumerate(steps, start=1):
        if t + 1 < len(steps):
            store.prefetch(steps[t + 1][0], t + 2)
        rows, expected = store.pull(ids), ref.pull(ids)
        for name in expected:
            torch.testing.assert_close(rows[name], expected[name], rtol=0, atol=0)
        store.push(ids, grads, t)
        ref.push(ids, grads, t)
    assert store.times.prefetch_hits == STEPS and store.times.refreshes == STEPS - 1
    assert 0 < store.times.refreshed_rows < store.times.rows
    for name, table in ref.full_tables().items():
        torch.testing.assert_close(store.full_tables()[name], table, rtol=0, atol=0)


def test_pushes_are_not_lost_when_the_worker_stops(actors):
    """The payloads of a worker's pushes live in its own object store: once ``close()`` has
    returned, the worker can be killed at once and every push is still applied."""

    @ray.remote(num_cpus=0.1)
    class Pusher:  # a stand-in for a trainer worker: pushes every step, never waits, closes
        def run(self, shards: list, steps: list) -> int:
            store = ShardedStore(RayShards(shards), N, "mod", token=1)
            for t, (ids, grads) in enumerate(steps, start=1):
                store.push(ids, grads, t)
            store.close()
            return store.last_push_step

    steps = _steps(1)
    pusher = Pusher.remote()
    assert ray.get(pusher.run.remote(actors, steps)) == STEPS
    ray.kill(pusher, no_restart=True)
    assert [i["applied"] for i in ray.get([s.info.remote() for s in actors])] == [STEPS] * 2
    ref = LocalStore(N, MODEL, OPTIM, 0)
    for t, (ids, grads) in enumerate(steps, start=1):
        ref.push(ids, grads, t)
    store = ShardedStore(RayShards(actors), N, "mod", token=1)
    for name, table in ref.full_tables().items():
        torch.testing.assert_close(store.full_tables()[name], table, rtol=0, atol=0)
