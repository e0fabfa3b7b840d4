"""The Ray trainer's pure pieces without Ray: the resource plan, the epoch loss, the run state,
the imports that must not pull in Ray, and the pipelined worker loop against the in-process
trainer (shards in this process via ``LocalShards``)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from trainer.config import DistributedConfig, LossConfig, ModelConfig, TrainConfig
from trainer.data import DataConfig, SyntheticConfig, load_dataset
from trainer.distributed.plan import combine_epoch_losses, plan_resources
from trainer.distributed.worker import ShardedTrainer
from trainer.embeddings import table_dims
from trainer.run_state import RunState
from trainer.shards.client import ShardedStore
from trainer.shards.local import LocalShards
from trainer.shards.server import ShardServer, shard_factory
from trainer.train import Trainer

PURE = [
    "trainer.distributed.plan",
    "trainer.distributed.worker",
    "trainer.shards.client",
    "trainer.shards.local",
    "trainer.shards.server",
    "trainer.shards.slots",
    "trainer.run_state",
    "trainer.pipeline",
]


def test_pure_modules_do_not_import_ray():
    code = f"import sys\nfor m in {PURE!r}: __import__(m)\nprint('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_backend_choice():
    assert not DistributedConfig().uses_ray
    assert DistributedConfig(num_shards=2).uses_ray
    assert DistributedConfig(num_workers=2).uses_ray
    assert DistributedConfig(use_ray=True).uses_ray
    assert DistributedConfig(ray_address="auto").uses_ray


def test_resource_plan_fits_two_cores():
    d = DistributedConfig(num_shards=4, num_workers=2)
    plan = plan_resources(d, 2.0, 0.0, "auto")
    assert plan.shard_cpus == 0.1 and plan.worker_cpus == 0.8 and plan.worker_gpus == 0
    assert plan_resources(d, 16.0, 2.0, "auto").worker_gpus == 1
    with pytest.raises(ValueError, match="do not fit"):
        plan_resources(d.model_copy(update={"worker_cpus": 1.0}), 2.0, 0.0, "cpu")
    with pytest.raises(ValueError, match="one GPU per worker"):
        plan_resources(d, 2.0, 0.0, "cuda")


def test_epoch_loss_is_the_example_weighted_mean_per_step():
    assert combine_epoch_losses([[(2.0, 10), (4.0, 10)]]) == 3.0
    assert combine_epoch_losses([[(2.0, 30), (1.0, 1)], [(4.0, 10), (float("nan"), 0)]]) == (
        pytest.approx(((2 * 30 + 4 * 10) / 40 + 1.0) / 2)
    )


# --- the pipelined trainer loop, in process --------------------------------------------------
SYN = SyntheticConfig(num_users=150, num_items=120, mean_sequence_length=10, seed=5)


def loop_config(tmp_path, **dist) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(synthetic=SYN),
        model=ModelConfig(embedding_dim=8, hidden=[16]),
        loss=LossConfig(num_sampled=32),
        batch_size=32,
        epochs=1,
        progress=False,
        device="cpu",
        eval_ks=[10, 50],
        monitor="HR@50",
        out_dir=tmp_path,
        distributed=DistributedConfig(num_shards=3, partition_strategy="div", **dist),
    )


def sharded_trainer(cfg: TrainConfig, ds) -> ShardedTrainer:
    d = cfg.distributed
    servers = [
        ShardServer(
            shard_factory(
                q,
                d.num_shards,
                ds.num_items,
                table_dims(cfg.model),
                cfg.optim,
                d.partition_strategy,
                cfg.model.init_std,
                cfg.seed,
            ),
            1,
            d.mode,
            cfg.out_dir,
        )
        for q in range(d.num_shards)
    ]
    for s in servers:
        s.restore(1, "ckpt", s.restored_step)
    store = ShardedStore(
        LocalShards(servers), ds.num_items, d.partition_strategy, token=1, staleness=0
    )
    return ShardedTrainer(cfg, ds, store)


@pytest.fixture(scope="module")
def loop_data():
    return load_dataset(DataConfig(synthetic=SYN))


def test_pipelined_epoch_equals_local_epoch(tmp_path, loop_data):
    cfg = loop_config(tmp_path)
    local = Trainer(cfg, loop_data)
    expected = local.train_epoch()
    sharded = sharded_trainer(cfg, loop_data)
    log = sharded.run_epoch()
    assert len(log) == math.ceil(len(loop_data.train_positions) / cfg.batch_size)
    assert combine_epoch_losses([log]) == expected
    assert sharded.store.times.prefetch_hits == len(log)  # every step's rows were prefetched
    for name, table in local.store.full_tables().items():
        torch.testing.assert_close(sharded.store.full_tables()[name], table, rtol=0, atol=0)
    torch.testing.assert_close(
        torch.cat([p.reshape(-1) for p in sharded.tower.parameters()]),
        torch.cat([p.reshape(-1) for p in local.tower.parameters()]),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("depth", [1, 3])
def test_sync_pipeline_of_any_depth_equals_local_epoch(tmp_path, loop_data, depth):
    """Depth 1 pulls after each push; deeper pipelines pull early and are refreshed: the
    same losses, tables and tower as the in-process trainer, exactly."""
    cfg = loop_config(tmp_path, pipeline_depth=depth)
    local = Trainer(cfg, loop_data)
    expected = local.train_epoch()
    sharded = sharded_trainer(cfg, loop_data)
    log = sharded.run_epoch()
    assert combine_epoch_losses([log]) == expected
    t = sharded.store.times
    assert t.prefetch_hits == len(log)
    if depth == 1:
        assert t.refreshes == 0
    else:  # every step after the first was pulled early, then refreshed
        assert t.refreshes == len(log) - 1 and 0 < t.refreshed_rows < t.rows
    for name, table in local.store.full_tables().items():
        torch.testing.assert_close(sharded.store.full_tables()[name], table, rtol=0, atol=0)
    for mine, theirs in zip(sharded.tower.parameters(), local.tower.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_mid_epoch_checkpoint_resumes_exactly(tmp_path, loop_data):
    """The checkpoint keeps the sampler state from before the prefetched batch's draw."""
    cfg = loop_config(tmp_path, shard_checkpoint_every=5)
    whole = sharded_trainer(cfg.model_copy(update={"out_dir": tmp_path / "whole"}), loop_data)
    expected = whole.run_epoch()
    first = sharded_trainer(cfg, loop_data)
    first.run_epoch(max_steps=8)  # checkpoints at step 5; steps 6-8 are lost
    assert first.global_step == 8
    again = sharded_trainer(cfg, loop_data)  # the shards load their step-5 files
    assert {s.restored_step for s in again.store.backend.servers} == {5}
    again.load_checkpoint()
    assert again.global_step == 5 and len(again.epoch_log) == 5
    log = again.run_epoch()
    assert log == expected
    for name, table in whole.store.full_tables().items():
        torch.testing.assert_close(again.store.full_tables()[name], table, rtol=0, atol=0)


def test_async_loop_prefetches_before_compute(tmp_path, loop_data):
    cfg = loop_config(tmp_path, mode="async", max_staleness=1)
    tr = sharded_trainer(cfg, loop_data)
    tr.store.staleness = 1
    calls = tr.store.backend.calls
    tr.run_epoch(max_steps=3)
    kinds = [c[0] for c in calls if c[0] in ("pull", "push_part")]
    # step 1's rows, then step 2's pulled before step 1's push: one step of staleness
    assert kinds[:9] == ["pull"] * 3 + ["pull"] * 3 + ["push_part"] * 3
    assert tr.store.times.prefetch_hits == 3


def test_run_state_round_trip_and_resume_checks(tmp_path, loop_data):
    cfg = loop_config(tmp_path)
    local = Trainer(cfg, loop_data)
    local.train_batch(loop_data.train_positions[:32])
    path = local.save_checkpoint()
    state = RunState.load(path)
    assert state.global_step == 1 and state.world_size == 1 and state.config == cfg
    assert torch.equal(state.workers[0].gen, local.gen.get_state())
    assert torch.equal(
        state.store["shards"][0]["tables"]["bias"], local.store.full_tables()["bias"]
    )
    with pytest.raises(ValueError, match="resume with --num-workers 1"):
        state.check_resumable(cfg, 2, path)
    other = cfg.model_copy(update={"model": ModelConfig(embedding_dim=4, hidden=[16])})
    with pytest.raises(ValueError, match="another model or data config"):
        state.check_resumable(other, 1, path)
    torch.save({"tower": state.tower, "global_step": 1}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="not a run state"):
        RunState.load(tmp_path / "old.pt")
    again = Trainer(cfg, loop_data)
    again.load_checkpoint()
    assert again.global_step == 1
    for k, v in local.tower.state_dict().items():
        torch.testing.assert_close(again.tower.state_dict()[k], v, rtol=0, atol=0)
