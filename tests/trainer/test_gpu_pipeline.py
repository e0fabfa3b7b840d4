"""The pipelined sharded worker on CUDA: tower and rows on the GPU, pinned pulled rows, and the
same training as the in-process trainer on the same GPU."""

from __future__ import annotations

import pytest
import torch

from trainer.distributed.plan import combine_epoch_losses
from trainer.train import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("depth", [1, 2])
def test_sharded_worker_on_cuda_equals_in_process_on_cuda(tmp_path, depth):
    from tests.trainer.test_sharded_trainer import SYN, loop_config, sharded_trainer
    from trainer.data import DataConfig, load_dataset

    ds = load_dataset(DataConfig(synthetic=SYN))
    cfg = loop_config(tmp_path, pipeline_depth=depth).model_copy(update={"device": "cuda"})
    local = Trainer(cfg, ds)
    expected = local.train_epoch()
    sharded = sharded_trainer(cfg, ds)
    assert sharded.store.pin_memory and next(sharded.tower.parameters()).is_cuda
    rows = sharded.store.pull(torch.arange(10))
    assert all(r.is_pinned() for r in rows.values())
    sharded = sharded_trainer(cfg.model_copy(update={"out_dir": tmp_path / "b"}), ds)
    log = sharded.run_epoch()
    assert combine_epoch_losses([log]) == pytest.approx(expected, rel=1e-4)
    for name, table in local.store.full_tables().items():
        got = sharded.store.full_tables()[name]
        torch.testing.assert_close(got, table.cpu(), rtol=1e-3, atol=1e-5)
