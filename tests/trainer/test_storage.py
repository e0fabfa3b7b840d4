"""Storage without a shared filesystem: :mod:`trainer.storage` on a local path and on a real
S3-compatible server (moto's ``moto_server`` on 127.0.0.1, started by the module), the
two-slot checkpoint files and run states there, and a Ray run whose checkpoints and artifacts
go to S3 only (differential against the in-process run)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from tests.procs import S3_CREDENTIALS, MotoServer, environ
from trainer.run_state import RunState, WorkerState
from trainer.shards.slots import load_slotted, prev_path, save_slotted, slot_steps
from trainer.storage import StoragePath, fetch_artifacts, run_storage


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The moto server; the standard AWS variables set for this process (and the Ray it
    starts) while the module runs."""
    with environ(S3_CREDENTIALS):
        server = MotoServer(tmp_path_factory.mktemp("moto"))
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return StoragePath.of(tmp_path / "store")
    return StoragePath.of(request.getfixturevalue("s3").uri(f"t/{request.node.name}"))


def test_files_round_trip(root):
    f = root / "a" / "b.txt"
    assert not f.exists() and root.files() == []
    f.write_text("one")
    (root / "c.bin").write_bytes(b"\x00\x01")
    assert f.read_text() == "one" and (root / "c.bin").read_bytes() == b"\x00\x01"
    assert root.files() == ["a/b.txt", "c.bin"]
    f.replace(root / "a" / "moved.txt")
    assert not f.exists() and (root / "a" / "moved.txt").read_text() == "one"
    (root / "a" / "moved.txt").unlink()
    with pytest.raises(FileNotFoundError):
        (root / "a" / "moved.txt").unlink()
    (root / "a" / "moved.txt").unlink(missing_ok=True)
    root.rmtree()
    assert root.files() == []


def test_handle_pickles_as_its_uri(root):
    f = root / "x.pt"
    again = pickle.loads(pickle.dumps(f))
    assert again == f and again.uri() == f.uri()
    assert (f.name, f.stem, f.suffix, f.parent) == ("x.pt", "x", ".pt", root)
    assert "endpoint_override" not in str(f)  # messages never show the query


def test_slots_and_run_state(root):
    path = root / "shards" / "shard-0.pt"
    save_slotted({"step": 10, "w": torch.ones(3)}, path)
    save_slotted({"step": 20, "w": torch.zeros(3)}, path)
    assert sorted(slot_steps(path)) == [10, 20] and prev_path(path).exists()
    torch.testing.assert_close(load_slotted(path, 10)["w"], torch.ones(3))
    with pytest.raises(ValueError, match=r"no checkpoint for step 30 .* found steps \[10, 20\]"):
        load_slotted(path, 30)
    from tests.trainer.test_distributed import config

    cfg = config("unused")
    state = RunState(cfg, {"w": torch.arange(4.0)}, {"step": 7}, 1, 2, 7)
    state.workers = [WorkerState(torch.zeros(2, dtype=torch.uint8), torch.get_rng_state())]
    back = RunState.load(state.save(root / "checkpoint.pt"))
    assert back.global_step == 7 and back.config == cfg and back.world_size == 1
    torch.testing.assert_close(back.tower["w"], torch.arange(4.0))


def test_bad_locations_say_what_to_do(s3):
    with pytest.raises(ValueError, match="cannot open the storage location 'foo://x/y'"):
        StoragePath.of("foo://x/y")
    with pytest.raises(TypeError, match="not a local path"):
        os.fspath(StoragePath.of(s3.uri("p")))


def test_run_storage_defaults_to_out_dir(s3, tmp_path):
    from tests.trainer.test_distributed import config

    assert run_storage(config(tmp_path)) == StoragePath.of(tmp_path)
    uri = s3.uri("elsewhere")
    assert run_storage(config(tmp_path).model_copy(update={"storage": uri})).uri() == uri


@pytest.mark.slow
def test_ray_run_keeps_everything_in_s3(s3, tmp_path):
    """A Ray run (2 shards) with ``storage=s3://...``: the same curves and tables as the
    in-process run; the shard files, the run states and the artifacts are in S3 (verified
    there), the driver's out_dir holds only its local export."""
    ray = pytest.importorskip("ray")
    from tests.trainer.test_distributed import config, read_curves
    from trainer.artifacts import load_artifacts
    from trainer.distributed.session import local_ray
    from trainer.pipeline import run_training
    from trainer.train import Trainer

    torch.set_num_threads(1)
    reference = Trainer(config(tmp_path / "local"))
    curves = reference.fit()
    reference.load_best()
    tables = reference.store.full_tables()

    storage = s3.uri("ray-run")
    cfg = config(tmp_path / "driver", num_shards=2, use_ray=True, shard_checkpoint_every=10)
    cfg = cfg.model_copy(update={"storage": storage})
    if ray.is_initialized():
        ray.shutdown()
    with local_ray(2, log_to_driver=False):
        run_training(cfg)

    remote = StoragePath.of(storage)
    names = remote.files()
    for name in ("checkpoint.pt", "best.pt", "config.json", "artifacts/manifest.json"):
        assert name in names, names
    assert {n for n in names if n.startswith("shards/shard-")} == {
        f"shards/shard-{i}{s}.pt" for i in range(2) for s in ("", ".prev")
    }
    driver = tmp_path / "driver"
    local = {p.relative_to(driver).parts[0] for p in driver.rglob("*")}
    assert local == {"artifacts"}, local  # no checkpoint, no shard file on the driver
    fetched = fetch_artifacts(remote / "artifacts", tmp_path / "fetched")  # verifies sha256
    art = load_artifacts(fetched)
    got = read_curves(fetched)
    for g, e in zip(got, curves, strict=True):
        assert g["HR@50"] == pytest.approx(e["HR@50"], abs=1e-4)
        assert g["train_loss"] == pytest.approx(e["train_loss"], abs=1e-4)
    torch.testing.assert_close(
        torch.from_numpy(art.output_embeddings), tables["output"], rtol=0, atol=1e-4
    )
    state = RunState.load(remote / "best.pt")
    assert state.store["step"] == state.global_step > 0
