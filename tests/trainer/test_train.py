"""Training, checkpoint resume, export round trip and the trainer's pure helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer import metrics
from trainer.artifacts import ArtifactError, load_artifacts
from trainer.config import OptimConfig, load_config
from trainer.data import load_dataset
from trainer.embeddings import EmbeddingShard, RowOptimizer, table_dims
from trainer.model import init_rows
from trainer.pipeline import run_training
from trainer.train import Trainer, score_function

TINY = [
    "data.synthetic.num_users=600",
    "data.synthetic.num_items=300",
    "data.synthetic.dim=8",
    "data.synthetic.mean_sequence_length=20",
    "data.synthetic.seed=3",
    "model.embedding_dim=16",
    "model.hidden=[32]",
    "loss.num_sampled=64",
    "batch_size=128",
    "optim.lr=0.005",
    "optim.embedding_lr=0.01",
    "progress=false",
    "num_threads=1",
]


def tiny_config(tmp_path, *extra: str):
    return load_config(None, [*TINY, f"out_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def tiny_dataset():
    cfg = load_config(None, TINY)
    return load_dataset(cfg.data)


# --- config ---------------------------------------------------------------------------------
def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["model.hidden=[64, 32]", "epochs=3", "distributed.mode=async"])
    assert cfg.model.hidden == [64, 32] and cfg.epochs == 3 and cfg.distributed.mode == "async"


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        load_config(None, ["batch_size=0"])
    with pytest.raises(ValueError, match="tie_weights"):
        load_config(None, ["model.tie_weights=true", "model.input_dim=8"])
    with pytest.raises(ValueError, match="monitor"):
        load_config(None, ["monitor=HR@7"])
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(None, ["model.hidden=[1,"])
    with pytest.raises(ValueError, match=r"key\.sub=value"):
        load_config(None, ["epochs"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  unknown_field: 1\n")
    with pytest.raises(ValueError, match="unknown_field"):
        load_config(bad)


def test_shipped_configs_validate():
    for name in ("synthetic", "ml-100k", "ml-1m"):
        load_config(f"configs/{name}.yaml")


# --- pure pieces ----------------------------------------------------------------------------
def test_init_rows_do_not_depend_on_sharding():
    full = init_rows(torch.arange(200_000), 4, 0.1, seed=5, table="output")
    some = torch.tensor([0, 65_535, 65_536, 199_999, 7])
    assert torch.equal(init_rows(some, 4, 0.1, seed=5, table="output"), full[some])
    other = init_rows(some, 4, 0.1, seed=5, table="input")
    assert not torch.equal(other, full[some])


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_row_optimizer_matches_numpy(kind):
    rng = np.random.default_rng(0)
    cfg = OptimConfig(embedding_optimizer=kind, embedding_lr=0.1)
    table = torch.from_numpy(rng.standard_normal((6, 3)).astype(np.float32))
    ref = table.numpy().astype(np.float64)
    opt = RowOptimizer(cfg)
    state = opt.init_state(table)
    m, v = np.zeros_like(ref), np.zeros_like(ref)
    acc = np.full_like(ref, cfg.adagrad_init)
    for step in (1, 2, 3):
        rows = np.array([0, 2, 5]) if step != 2 else np.array([2, 3])
        g = rng.standard_normal((len(rows), 3))
        opt.apply(table, state, torch.from_numpy(rows), torch.from_numpy(g).float(), step)
        if kind == "sgd":
            ref[rows] -= 0.1 * g
        elif kind == "adagrad":
            acc[rows] += g * g
            ref[rows] -= 0.1 * g / (np.sqrt(acc[rows]) + 1e-10)
        else:
            b1, b2 = cfg.betas
            m[rows] = b1 * m[rows] + (1 - b1) * g
            v[rows] = b2 * v[rows] + (1 - b2) * g * g
            lr_t = 0.1 * np.sqrt(1 - b2**step) / (1 - b1**step)
            ref[rows] -= lr_t * m[rows] / (np.sqrt(v[rows]) + cfg.eps)
    np.testing.assert_allclose(table.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_embedding_shard_round_trip_and_errors(tmp_path):
    cfg = load_config(None, TINY)
    shard = EmbeddingShard(1, 3, 10, table_dims(cfg.model), cfg.optim, "div", seed=1)
    assert shard.size == 3
    rows = shard.pull(torch.tensor([0, 2]))
    assert rows["output"].shape == (2, 16) and rows["bias"].shape == (2,)
    shard.push(torch.tensor([0, 2]), {"output": torch.ones(2, 16), "bias": torch.ones(2)}, 1)
    shard.save(tmp_path / "s.pt")
    other = EmbeddingShard(1, 3, 10, table_dims(cfg.model), cfg.optim, "div", seed=1)
    other.load(tmp_path / "s.pt")
    assert torch.equal(other.tables["output"], shard.tables["output"])
    assert other.counters.pushes == 1
    with pytest.raises(ValueError, match=r"local rows \[0, 3\)"):
        shard.pull(torch.tensor([3]))
    with pytest.raises(ValueError, match="unknown tables"):
        shard.push(torch.tensor([0]), {"nope": torch.ones(1)}, 2)
    wrong = EmbeddingShard(0, 3, 10, table_dims(cfg.model), cfg.optim, "div", seed=1)
    with pytest.raises(ValueError, match="checkpoint is for shard"):
        wrong.load(tmp_path / "s.pt")


# --- training -------------------------------------------------------------------------------
def test_short_training_beats_popularity(tmp_path, tiny_dataset):
    cfg = tiny_config(tmp_path, "epochs=4", "monitor=HR@50")
    trainer = Trainer(cfg, tiny_dataset)
    curves = trainer.fit()
    assert len(curves) >= 2 and curves[-1]["train_loss"] < curves[0]["train_loss"]
    trainer.load_best()
    enc, tables = trainer.encoder()
    ours = metrics.evaluate(tiny_dataset, score_function(enc, tables, tiny_dataset), "test")
    pop = metrics.evaluate(tiny_dataset, metrics.popularity_score_fn(tiny_dataset), "test")
    assert ours["filtered"]["HR@50"] > pop["filtered"]["HR@50"] + 0.05, (ours, pop)


@pytest.mark.parametrize("negatives", ["in_batch", "mixed"])
def test_other_negatives_train(tmp_path, tiny_dataset, negatives):
    cfg = tiny_config(tmp_path, "epochs=1", f"loss.negatives={negatives}")
    curves = Trainer(cfg, tiny_dataset).fit()
    assert np.isfinite(curves[0]["train_loss"])


def test_full_softmax_and_tied_weights_train(tmp_path, tiny_dataset):
    cfg = tiny_config(tmp_path, "epochs=1", "loss.kind=full", "model.tie_weights=true")
    curves = Trainer(cfg, tiny_dataset).fit()
    assert np.isfinite(curves[0]["train_loss"])


def test_num_sampled_larger_than_catalogue_is_refused(tmp_path, tiny_dataset):
    cfg = tiny_config(tmp_path, "loss.num_sampled=100000")
    with pytest.raises(ValueError, match="num_sampled"):
        Trainer(cfg, tiny_dataset)


def test_resume_mid_epoch_equals_uninterrupted(tmp_path, tiny_dataset, monkeypatch):
    ref_cfg = tiny_config(tmp_path / "ref", "epochs=2")
    reference = Trainer(ref_cfg, tiny_dataset)
    reference.fit()

    cfg = tiny_config(tmp_path / "crash", "epochs=2", "checkpoint_every=3")
    crashing = Trainer(cfg, tiny_dataset)
    import trainer.train as train_module

    real_step, calls = train_module.train_step, {"n": 0}

    def flaky_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # step 8 of epoch 1 (checkpoint at step 6)
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", flaky_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.fit()
    monkeypatch.setattr(train_module, "train_step", real_step)

    resumed = Trainer(cfg, tiny_dataset)
    resumed.load_checkpoint()
    assert resumed.global_step == 6 and resumed.batch_in_epoch == 6
    resumed.fit()
    ref_loss = [c["train_loss"] for c in reference.curves]
    got_loss = [c["train_loss"] for c in resumed.curves]
    # Epoch 1's mean loss on the resumed run only covers the batches after the crash, so
    # compare the end state: tables, tower and epoch 2's loss must be identical.
    assert got_loss[1] == pytest.approx(ref_loss[1], rel=1e-6)
    for name, table in reference.store.full_tables().items():
        torch.testing.assert_close(resumed.store.full_tables()[name], table, rtol=0, atol=1e-6)
    for k, v in reference.tower.state_dict().items():
        torch.testing.assert_close(resumed.tower.state_dict()[k], v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_export_and_reload_round_trip(tmp_path, tiny_dataset, tied):
    cfg = tiny_config(tmp_path, "epochs=1", f"model.tie_weights={str(tied).lower()}")
    path = run_training(cfg, dataset=tiny_dataset)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["num_items"] == tiny_dataset.num_items
    assert set(manifest["files"]) >= {
        "items.csv",
        "item_tables.safetensors",
        "user_tower.safetensors",
        "curves.csv",
        "curves.png",
    }
    hr = {m: manifest["metrics"][m]["filtered"]["HR@10"] for m in ("model", "popularity")}
    assert 0 < hr["popularity"] < hr["model"] <= 1  # one trained epoch already beats popularity
    art = load_artifacts(path)
    assert art.num_items == tiny_dataset.num_items
    assert list(art.item_ids[:5]) == [str(x) for x in tiny_dataset.items.original_ids[:5]]
    # The reloaded encoder gives the same scores as the trained model.
    trainer = Trainer(cfg, tiny_dataset)
    trainer.load_best()
    enc, tables = trainer.encoder()
    positions = tiny_dataset.test_positions[:16]
    expected = score_function(enc, tables, tiny_dataset)(positions)
    reloaded = score_function(
        art.encoder,
        {
            "output": torch.from_numpy(art.output_embeddings),
            "bias": torch.from_numpy(art.output_biases),
        },
        tiny_dataset,
    )(positions)
    torch.testing.assert_close(reloaded, expected)
    # A modified file is refused with a clear error.
    with open(path / "items.csv", "a") as f:
        f.write("tampered\n")
    with pytest.raises(ArtifactError, match=r"checksum mismatch for items\.csv"):
        load_artifacts(path)
