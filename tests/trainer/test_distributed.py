"""Sharded training on a real (embedded) Ray: equality with the in-process trainer in sync
mode, recovery from a killed shard actor, resume after a killed job, and several workers.

One small Ray instance (2 CPUs, no dashboard) is shared by the module; every run kills its
actors when it ends.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import re
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from trainer.artifacts import load_artifacts  # noqa: E402
from trainer.config import (  # noqa: E402
    DistributedConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from trainer.data import DataConfig, SyntheticConfig, load_dataset  # noqa: E402
from trainer.distributed.driver import train_distributed  # noqa: E402
from trainer.distributed.session import local_ray  # noqa: E402
from trainer.model import SequenceConfig  # noqa: E402
from trainer.pipeline import run_training  # noqa: E402
from trainer.train import Trainer  # noqa: E402

SYN = SyntheticConfig(num_users=300, num_items=500, mean_sequence_length=12, seed=3)


def config(out_dir, **dist) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(synthetic=SYN),
        model=ModelConfig(embedding_dim=16, hidden=[32]),
        loss=LossConfig(num_sampled=64),
        optim=OptimConfig(lr=0.005, embedding_lr=0.01),
        batch_size=64,
        epochs=2,
        patience=5,
        eval_ks=[10, 50],
        monitor="HR@50",
        progress=False,
        device="cpu",
        num_threads=1,
        out_dir=out_dir,
        distributed=DistributedConfig(**dist),
    )


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():  # another module's Ray: use it
        yield
        return
    with local_ray(2, log_to_driver=False):  # 127.0.0.1 only; shut down after the module
        yield


@pytest.fixture(scope="module")
def dataset():
    return load_dataset(DataConfig(synthetic=SYN))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, dataset):
    """The undisturbed in-process run: per-epoch curves and the best epoch's tables."""
    torch.set_num_threads(1)
    trainer = Trainer(config(tmp_path_factory.mktemp("local")), dataset)
    curves = trainer.fit()
    trainer.load_best()
    return curves, trainer.store.full_tables()


def read_curves(artifacts) -> list[dict]:
    with open(artifacts / "curves.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def assert_curves_close(got: list[dict], expected: list[dict], key: str, tol: float) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g[key] == pytest.approx(e[key], abs=tol), (key, got, expected)


class Killer(threading.Thread):
    """Kills the new run's actor ``<run>-<suffix>`` once its shard 0 has applied ``at_step``."""

    def __init__(self, suffix: str, at_step: int, restart: bool) -> None:
        super().__init__(daemon=True)
        self.suffix, self.at_step, self.restart = suffix, at_step, restart
        self.before = set(ray.util.list_named_actors())
        self.killed_at: int | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            names = [n for n in ray.util.list_named_actors() if n not in self.before]
            target = [n for n in names if n.endswith(self.suffix)]
            if target:
                run = target[0][: -len(self.suffix) - 1]
                victim, shard0 = ray.get_actor(target[0]), ray.get_actor(f"{run}-shard-0")
                while time.monotonic() < deadline:
                    applied = ray.get(shard0.info.remote())["applied"]
                    if applied >= self.at_step:
                        ray.kill(victim, no_restart=not self.restart)
                        self.killed_at = applied
                        return
                    time.sleep(0.01)
            time.sleep(0.05)


@pytest.mark.parametrize(("num_shards", "strategy"), [(1, "mod"), (3, "div")])
def test_sync_sharded_training_equals_local(ray_cluster, local_run, tmp_path, num_shards, strategy):
    curves, tables = local_run
    cfg = config(tmp_path, num_shards=num_shards, partition_strategy=strategy, use_ray=True)
    artifacts = run_training(cfg)
    got = read_curves(artifacts)
    assert_curves_close(got, curves, "train_loss", 1e-4)
    assert_curves_close(got, curves, "HR@50", 1e-4)
    art = load_artifacts(artifacts)
    torch.testing.assert_close(
        torch.from_numpy(art.output_embeddings), tables["output"], rtol=0, atol=1e-4
    )
    torch.testing.assert_close(
        torch.from_numpy(art.output_biases), tables["bias"], rtol=0, atol=1e-4
    )
    torch.testing.assert_close(art.encoder.input_embeddings, tables["input"], rtol=0, atol=1e-4)
    files = sorted(p.name for p in (tmp_path / "shards").glob("shard-*.pt"))
    assert files == sorted(f"shard-{i}{s}.pt" for i in range(num_shards) for s in ("", ".prev"))
    assert art.manifest["metrics"]["recoveries"] == 0


def test_killed_shard_rolls_back_to_a_common_checkpoint(
    ray_cluster, local_run, dataset, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="trainer")
    curves, _ = local_run  # sync training with one worker == the undisturbed run
    cfg = config(tmp_path, num_shards=3, shard_checkpoint_every=10)
    killer = Killer("shard-1", at_step=57, restart=True)  # epoch 2 (43 steps an epoch)
    killer.start()
    result = train_distributed(cfg, dataset=dataset)
    killer.join(timeout=5)
    assert killer.killed_at is not None and killer.killed_at >= 57
    assert result.recoveries == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "trainer.distributed.driver"]
    pattern = (
        r"shard 1 restarted, restored step (\d+); rolling every shard and worker back to the "
        r"common checkpoint at step (\d+); (redoing steps \d+-\d+|nothing to redo)$"
    )
    found = [m for m in map(functools.partial(re.match, pattern), messages) if m]
    assert found, messages
    restored, common, redo = int(found[0][1]), int(found[0][2]), found[0][3]
    assert restored == common and common in (50, 60, 70, 80)  # checkpoints every 10 steps
    assert redo.startswith(f"redoing steps {common + 1}-") or redo == "nothing to redo"
    hr = [c["HR@50"] for c in result.curves]
    assert hr[-1] == pytest.approx(curves[-1]["HR@50"], abs=0.02)
    assert_curves_close(result.curves, curves, "train_loss", 1e-4)  # redone exactly


def test_killed_job_resumes_and_completes(ray_cluster, local_run, dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trainer")
    curves, tables = local_run
    cfg = config(tmp_path, num_shards=2, shard_checkpoint_every=10, max_recoveries=0)
    killer = Killer("worker-0", at_step=25, restart=False)
    killer.start()
    with pytest.raises(RuntimeError, match="resume with --resume"):
        train_distributed(cfg, dataset=dataset)
    killer.join(timeout=5)
    assert killer.killed_at is not None
    assert (tmp_path / "checkpoint.pt").exists()
    result = train_distributed(cfg, resume=True, dataset=dataset)
    resumed = [re.search(r"resuming from step (\d+)", r.getMessage()) for r in caplog.records]
    step = next(int(m.group(1)) for m in resumed if m)
    assert step % 10 == 0 and step >= 20  # checkpoints every 10 steps; killed after 25
    assert_curves_close(result.curves, curves, "train_loss", 1e-4)
    for name, table in tables.items():
        torch.testing.assert_close(result.tables[name], table, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_two_workers_train_in_step(ray_cluster, local_run, dataset, tmp_path, mode):
    curves, _ = local_run
    cfg = config(tmp_path, num_shards=2, num_workers=2, mode=mode, max_staleness=1)
    result = train_distributed(cfg, dataset=dataset)  # checks the towers agree every epoch
    losses = [c["train_loss"] for c in result.curves]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert result.curves[-1]["HR@50"] > curves[-1]["HR@50"] - 0.05
    steps_per_epoch = math.ceil(len(dataset.train_positions) / cfg.batch_size)
    assert result.global_step == 2 * steps_per_epoch and result.recoveries == 0


def test_sequence_tower_on_sharded_tables_equals_local(ray_cluster, dataset, tmp_path):
    """The sequence tower (every window position a target, shared negatives) over 2 Ray shards
    trains exactly as in process, and its artifacts serve its own user vectors."""
    model = ModelConfig(
        tower="sequence", embedding_dim=16, sequence=SequenceConfig(blocks=1, dropout=0.1)
    )
    local_cfg = config(tmp_path / "local").model_copy(update={"model": model, "batch_size": 32})
    torch.set_num_threads(1)
    trainer = Trainer(local_cfg, dataset)
    curves = trainer.fit()
    trainer.load_best()
    assert trainer.examples_in(trainer.units) == len(dataset.train_positions)
    ray_cfg = local_cfg.model_copy(
        update={
            "out_dir": tmp_path / "ray",
            "distributed": DistributedConfig(num_shards=2, use_ray=True),
        }
    )
    artifacts = run_training(ray_cfg, dataset=dataset)
    got = read_curves(artifacts)
    assert_curves_close(got, curves, "train_loss", 1e-4)
    assert_curves_close(got, curves, "HR@50", 1e-4)
    art = load_artifacts(artifacts)
    assert type(art.encoder.tower).__name__ == "SequenceTower"
    tables = trainer.store.full_tables()
    torch.testing.assert_close(
        torch.from_numpy(art.output_embeddings), tables["output"], rtol=0, atol=1e-4
    )
    hist = [[3, 1, 4], [1, 5, 9, 2, 6]]
    expected = trainer.encoder()[0].encode(hist)
    torch.testing.assert_close(art.encoder.encode(hist), expected, rtol=0, atol=1e-4)
