"""sampler.routing against a NumPy reference: routing and its inverse, and partition's
reassembly of duplicated, unsorted ids (with ``inverse``, or scattering with ``order``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sampler import routing

LAYOUTS = [(10, 3), (7, 4), (3, 5), (12, 4), (1000, 7), (50, 1)]  # uneven, fewer rows, even


def np_route(ids: np.ndarray, n: int, p: int, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """TensorFlow's embedding_lookup arithmetic, written out with NumPy."""
    if p == 1:
        return np.zeros_like(ids), ids
    if strategy == "mod":
        return ids % p, ids // p
    per, extras = divmod(n, p)
    if per == 0:
        return ids, np.zeros_like(ids)
    threshold = extras * (per + 1)
    shard = np.where(ids < threshold, ids // (per + 1), extras + (ids - threshold) // per)
    start = shard * per + np.minimum(shard, extras)
    return shard, ids - start


def np_sizes(n: int, p: int, strategy: str) -> list[int]:
    shard, _ = np_route(np.arange(n), n, p, strategy)
    return np.bincount(shard, minlength=p).tolist()


@pytest.mark.parametrize("strategy", ["mod", "div"])
@pytest.mark.parametrize(("n", "p"), LAYOUTS)
def test_route_and_inverse_match_numpy(strategy, n, p):
    ids = np.arange(n)
    shard, local = routing.route(torch.from_numpy(ids), n, p, strategy)
    ref_shard, ref_local = np_route(ids, n, p, strategy)
    np.testing.assert_array_equal(shard.numpy(), ref_shard)
    np.testing.assert_array_equal(local.numpy(), ref_local)
    sizes = routing.shard_sizes(n, p)
    assert sizes == np_sizes(n, p, strategy)
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    seen = np.concatenate(
        [
            routing.global_ids(q, torch.arange(s), n, p, strategy).numpy()
            for q, s in enumerate(sizes)
        ]
    )
    np.testing.assert_array_equal(np.sort(seen), ids)  # every id on exactly one shard


@pytest.mark.parametrize("strategy", ["mod", "div"])
@pytest.mark.parametrize(("n", "p"), LAYOUTS)
def test_partition_reassembles_duplicates_in_order(strategy, n, p):
    rng = np.random.default_rng(n * 31 + p)
    table = rng.standard_normal((n, 3)).astype(np.float32)
    parts = routing.split_rows(torch.from_numpy(table), p, strategy)
    ids = rng.integers(0, n, 40)  # unsorted, with duplicates
    part = routing.partition(torch.from_numpy(ids), n, p, strategy)
    gathered = torch.cat([parts[q][part.local_ids[q]] for q in range(p)])
    np.testing.assert_array_equal(gathered[part.inverse].numpy(), table[ids])
    np.testing.assert_array_equal(routing.join_rows(parts, strategy).numpy(), table)
    # ``order``: row k of the shards' concatenation belongs to ids[order[k]]
    np.testing.assert_array_equal(gathered.numpy(), table[ids[part.order.numpy()]])
    scattered = torch.empty_like(gathered).index_copy_(0, part.order, gathered)
    np.testing.assert_array_equal(scattered.numpy(), table[ids])
