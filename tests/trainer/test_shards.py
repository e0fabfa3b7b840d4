"""The sharded store without Ray (shards in this process via ``LocalShards``): the client's
reassembly and call pattern, the shards' sync/async bookkeeping, fencing, two-slot checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import ModelConfig, OptimConfig
from trainer.embeddings import LocalStore, table_dims
from trainer.shards.client import ShardedStore, check_ref
from trainer.shards.local import LocalShards
from trainer.shards.server import ShardRestartedError, ShardServer, shard_factory
from trainer.shards.slots import load_slotted, prev_path, save_slotted

# --- the client over in-process shards -------------------------------------------------------
MODEL = ModelConfig(embedding_dim=8, hidden=[16], init_std=0.1)
OPTIM = OptimConfig(embedding_optimizer="adam", embedding_lr=0.05)


def make_store(
    n: int,
    p: int,
    strategy: str = "mod",
    workers: int = 1,
    mode: str = "sync",
    run_dir=None,
    optim: OptimConfig = OPTIM,
    staleness: int = 0,
) -> tuple[ShardedStore, list[ShardServer]]:
    servers = [
        ShardServer(
            shard_factory(q, p, n, table_dims(MODEL), optim, strategy, MODEL.init_std, 0),
            workers,
            mode,
            run_dir,
        )
        for q in range(p)
    ]
    for s in servers:
        s.restore(1, "ckpt", 0)
    store = ShardedStore(LocalShards(servers), n, strategy, token=1, staleness=staleness)
    return store, servers


@pytest.mark.parametrize(("strategy", "n", "p"), [("mod", 101, 4), ("div", 101, 3), ("div", 5, 7)])
def test_pull_matches_full_table_with_duplicates(strategy, n, p):
    store, _ = make_store(n, p, strategy)
    full = LocalStore(n, MODEL, OPTIM, 0).full_tables()
    ids = torch.tensor([[3, 0, 3], [n - 1, 2, 0]]) % n  # 2-D, duplicates, unsorted
    rows = store.pull(ids)
    for name, table in full.items():
        torch.testing.assert_close(rows[name], table[ids.reshape(-1)], rtol=0, atol=0)
    for name, table in store.full_tables().items():
        torch.testing.assert_close(table, full[name], rtol=0, atol=0)


def test_one_pull_and_one_push_per_shard_issued_before_waiting():
    store, _ = make_store(100, 4, "div")
    calls = store.backend.calls
    store.pull(torch.arange(0, 100, 3))
    assert calls == [("pull", 0), ("pull", 1), ("pull", 2), ("pull", 3), ("get", 4)]
    calls.clear()
    ids = torch.tensor([1, 5, 9])  # touches shards 0 and 1 of a 'div' layout only
    store.push({"output": ids}, {"output": torch.ones(3, 8)}, 1)
    assert calls == [("push_part", q) for q in range(4)]  # every shard counts the step
    calls.clear()
    store.pull(torch.tensor([7, 7, 7]))  # deduplicated: one row asked of its shard only
    assert [c for c in calls if c[0] == "pull"] == [("pull", 0)]
    assert store.times.rows == 1 + 34


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_push_matches_local_store_and_sums_duplicates(optimizer):
    optim = OptimConfig(embedding_optimizer=optimizer, embedding_lr=0.05)
    n = 37
    store, _ = make_store(n, 3, "div", optim=optim)
    local = LocalStore(n, MODEL, optim, 0)
    rng = np.random.default_rng(0)
    for step in range(1, 6):
        ids = torch.from_numpy(rng.integers(0, n, 12))
        grads = {
            "output": torch.randn(12, 8),
            "bias": torch.randn(12),
            "input": torch.randn(12, 8),
        }
        store.push({k: ids for k in grads}, grads, step)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        summed = {
            k: g.new_zeros((uniq.numel(), *g.shape[1:])).index_add_(0, inverse, g)
            for k, g in grads.items()
        }
        local.push({k: uniq for k in grads}, summed, step)
    for name, table in local.full_tables().items():
        torch.testing.assert_close(store.full_tables()[name], table, rtol=0, atol=1e-7)


def test_push_rejects_misaligned_gradients():
    store, _ = make_store(20, 2)
    with pytest.raises(ValueError, match="one gradient row per id"):
        store.push({"bias": torch.tensor([1, 2])}, {"bias": torch.zeros(3)}, 1)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 20\)"):
        store.pull(torch.tensor([20]))


def test_prefetch_is_collected_by_the_matching_pull():
    store, _ = make_store(50, 2)
    ids = torch.tensor([4, 9, 4, 30])
    store.prefetch(ids, 1)
    first = store.pull(ids)
    assert store.times.prefetch_hits == 1
    store.prefetch(ids, 1)
    other = store.pull(torch.tensor([4, 9]))  # different ids: the prefetch is dropped
    assert store.times.prefetch_hits == 1
    torch.testing.assert_close(other["output"], first["output"][:2])
    store.prefetch(ids, 2)  # issued before step 1's push: that push carries its refresh
    store.push({"bias": torch.tensor([4])}, {"bias": torch.ones(1)}, 1)
    after = store.pull(ids)
    assert store.times.prefetch_hits == 2 and store.times.refreshes == 1
    assert store.times.refreshed_rows == 1  # row 4 only
    assert after["bias"][0] != first["bias"][0] and after["bias"][2] == after["bias"][0]
    torch.testing.assert_close(after["output"], first["output"], rtol=0, atol=0)


# --- the shard's bookkeeping -----------------------------------------------------------------
def test_sync_shard_sums_the_workers_of_a_step_and_applies_in_order():
    n = 30
    one, _ = make_store(n, 2, workers=1)
    two_a, servers = make_store(n, 2, workers=2)
    two_b = ShardedStore(two_a.backend, n, "mod", token=1, worker=1)
    ids = torch.tensor([1, 2, 3, 4])
    g_a, g_b = torch.randn(4, 8), torch.randn(4, 8)
    two_a.grad_scale = two_b.grad_scale = 0.5
    two_a.push({"output": ids}, {"output": g_a}, 1)
    assert not servers[0].ready(1) and servers[0].applied == 0  # waits for worker 1
    with pytest.raises(RuntimeError, match="needs step 1 applied"):
        servers[0].pull(1, np.array([0]), 1)
    two_b.push({"output": ids[:2]}, {"output": g_b[:2]}, 1)
    assert servers[0].ready(1) and servers[1].applied == 1
    expected = (g_a + torch.cat([g_b[:2], torch.zeros(2, 8)])) * 0.5
    one.push({"output": ids}, {"output": expected}, 1)
    torch.testing.assert_close(
        two_a.full_tables()["output"], one.full_tables()["output"], rtol=0, atol=1e-6
    )


def test_pushes_are_applied_lazily_row_by_row():
    _, servers = make_store(20, 1)
    s = servers[0]
    s.push(1, 0, 1, {"bias": np.array([1, 2, 3])}, {"bias": np.ones(3, np.float32)})
    assert s.applied == 1 and len(s.deferred) == 1  # counted, recorded, not applied yet
    assert float(s.shard.tables["bias"][1]) == 0.0
    rows, _ = s.pull(1, np.array([2, 5]), 1)  # applies the pending update of row 2 only
    assert rows["bias"][0] == pytest.approx(-0.05) and rows["bias"][1] == 0.0
    assert float(s.shard.tables["bias"][1]) == 0.0 and len(s.deferred) == 1
    s.settle()
    assert float(s.shard.tables["bias"][1]) == pytest.approx(-0.05) and not s.deferred
    with pytest.raises(ValueError, match=r"local rows in \[0, 20\)"):
        s.push(1, 0, 2, {"bias": np.array([20])}, {"bias": np.ones(1, np.float32)})
    with pytest.raises(ValueError, match="unknown tables"):
        s.push(1, 0, 2, {"users": np.array([1])}, {"users": np.ones(1, np.float32)})


def test_async_shard_applies_at_once_and_bounds_staleness():
    _, servers = make_store(10, 1, workers=2, mode="async")
    s = servers[0]
    empty = ({}, {})
    s.push(1, 0, 1, *empty)
    s.push(1, 0, 2, *empty)
    assert s.done == {0: 2, 1: 0} and s.applied == 0
    assert s.ready(0) and not s.ready(1)  # a pull for step 3 with staleness 1 needs step 1
    s.push(1, 1, 1, *empty)
    assert s.ready(1) and not s.ready(2)


def test_stale_tokens_are_refused_until_restore(tmp_path):
    store, servers = make_store(20, 2, run_dir=tmp_path)
    store.push({"bias": torch.tensor([3])}, {"bias": torch.ones(1)}, 1)
    ref10 = store.save_shards("ckpt", 1)
    assert ref10["step"] == 1 and len(ref10["files"]) == 2
    store.push({"bias": torch.tensor([3])}, {"bias": torch.ones(1)}, 2)
    store.save_shards("ckpt", 2)
    at2 = store.full_tables()["bias"][3].item()
    # a shard that "restarts" loads its last checkpoint and is fenced
    reborn = ShardServer(servers[1]._make_shard, 1, "sync", tmp_path)
    assert reborn.token == -1 and reborn.restored_step == 2 and reborn.applied == 2
    store.backend.servers[1] = reborn
    with pytest.raises(ShardRestartedError, match="roll the run back"):
        store.pull(torch.tensor([3]))
    # rolling every shard back to step 1 uses the previous slot
    store.restore_shards(ref10, token=2)
    assert all(s.token == 2 and s.applied == 1 for s in store.backend.servers)
    back = store.full_tables()["bias"][3].item()
    assert back != at2 and back == pytest.approx(-0.05, abs=1e-6)  # Adam's first step: -lr
    with pytest.raises(ValueError, match="no checkpoint for step 7"):
        store.restore_shards({**ref10, "step": 7})


def test_two_slot_files_survive_a_crash_between_rename_and_write(tmp_path):
    path = tmp_path / "shard-0.pt"
    save_slotted({"step": 10}, path)
    save_slotted({"step": 20}, path)
    assert load_slotted(path, 10)["step"] == 10 and load_slotted(path, 20)["step"] == 20
    path.unlink()  # as if the process died after renaming the old file away
    assert prev_path(path).exists() and load_slotted(path, 10)["step"] == 10


def test_references_name_their_layout():
    store, _ = make_store(20, 2)
    ref = {
        "format": "sharded-v1",
        "tag": "ckpt",
        "step": 0,
        "num_shards": 2,
        "num_rows": 20,
        "partition_strategy": "mod",
    }
    check_ref(ref, 2, 20, "mod")
    with pytest.raises(ValueError, match=r"same distributed\.num_shards"):
        check_ref(ref, 3, 20, "mod")
    with pytest.raises(ValueError, match="in-process trainer"):
        store.load_state_dict({"shards": []})


# --- the pipeline's refresh and the vectorised row update ------------------------------------
def test_refresh_brings_an_early_pull_up_to_date_with_every_workers_push():
    """Sync, 2 workers, 2 shards: a pull for step 2 issued before step 1's pushes, refreshed by
    worker 0's push, equals a pull issued after both workers' pushes."""
    n = 40
    a, _ = make_store(n, 2, workers=2)
    b = ShardedStore(a.backend, n, "mod", token=1, worker=1)
    ref, _ = make_store(n, 2, workers=2)
    ref_b = ShardedStore(ref.backend, n, "mod", token=1, worker=1)
    gen = torch.Generator().manual_seed(3)
    ids = torch.tensor([0, 1, 2, 5, 8, 13, 21, 34])
    a.prefetch(ids, 2)  # answered now: rows as of step 0
    pushes = [(w, torch.randperm(n, generator=gen)[:6]) for w in (0, 1)]
    grads = {w: torch.randn(6, 8, generator=gen) for w, _ in pushes}
    for store, other in ((a, b), (ref, ref_b)):
        for w, rows in pushes:
            (store if w == 0 else other).push({"output": rows}, {"output": grads[w]}, 1)
    got = a.pull(ids)  # the refresh came back with worker 0's push, once worker 1's was in
    expected = ref.pull(ids)
    assert a.times.refreshes == 1 and a.times.prefetch_hits == 1
    changed = set(torch.cat([r for _, r in pushes]).tolist()) & set(ids.tolist())
    assert a.times.refreshed_rows == len(changed) > 0  # only the rows the pushes changed
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def _loop_reference(kind: str, table, state, rows, grad, step, cfg: OptimConfig):
    """The row optimizer, one row at a time, in float64."""
    b1, b2 = cfg.betas
    for i, r in enumerate(rows.tolist()):
        g = grad[i]
        if kind == "sgd":
            table[r] -= cfg.embedding_lr * g
        elif kind == "adagrad":
            state["acc"][r] += g * g
            table[r] -= cfg.embedding_lr * g / (state["acc"][r].sqrt() + 1e-10)
        else:
            state["m"][r] = b1 * state["m"][r] + (1 - b1) * g
            state["v"][r] = b2 * state["v"][r] + (1 - b2) * g * g
            size = cfg.embedding_lr * (1 - b2**step) ** 0.5 / (1 - b1**step)
            table[r] -= size * state["m"][r] / (state["v"][r].sqrt() + cfg.eps)


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_shard_row_update_equals_a_float64_loop(kind):
    """Deferred pushes of several steps, applied by the server's vectorised update (partly by
    a pull's settle, the rest after), against a per-row float64 loop."""
    n, optim = 64, OptimConfig(embedding_optimizer=kind, embedding_lr=0.05)
    _, servers = make_store(n, 1, optim=optim)
    s = servers[0]
    table = s.shard.tables["output"].double().clone()
    state = {k: v.double().clone() for k, v in s.shard.state["output"].items()}
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        rows = torch.randperm(n, generator=gen)[:20]
        grad = torch.randn(20, 8, generator=gen)
        s.push(1, 0, step, {"output": rows.numpy()}, {"output": grad.numpy()})
        _loop_reference(kind, table, state, rows, grad.double(), step, optim)
        if step == 3:
            s.pull(1, np.arange(0, n, 5), step)  # settles some rows of steps 1-3 first
    s.settle()
    torch.testing.assert_close(s.shard.tables["output"].double(), table, rtol=1e-6, atol=1e-7)
    for k, v in state.items():
        torch.testing.assert_close(s.shard.state["output"][k].double(), v, rtol=2e-5, atol=1e-9)


def test_sync_shard_applies_one_workers_pushes_in_step_order():
    """Ray does not order an asyncio actor's calls: a sync shard that gets step 2 before
    step 1 holds it back, so the rows equal those of pushes in order."""
    n, gen = 20, torch.Generator().manual_seed(2)
    pushes = [
        (torch.randperm(n, generator=gen)[:5].sort().values, torch.randn(5, 8)) for _ in range(3)
    ]
    _, in_order = make_store(n, 1)
    _, shuffled = make_store(n, 1)
    for step in (1, 2, 3):
        ids, grad = pushes[step - 1]
        in_order[0].push(1, 0, step, {"output": ids.numpy()}, {"output": grad.numpy()})
    for step in (2, 3, 1):
        ids, grad = pushes[step - 1]
        shuffled[0].push(1, 0, step, {"output": ids.numpy()}, {"output": grad.numpy()})
        assert shuffled[0].applied == (0 if step != 1 else 3)
    in_order[0].settle()
    shuffled[0].settle()
    torch.testing.assert_close(
        shuffled[0].shard.tables["output"], in_order[0].shard.tables["output"], rtol=0, atol=0
    )
