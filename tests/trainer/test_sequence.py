"""The sequence tower (causal self-attention) and the holdout / refit path, seeded and real."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.tiny import TINY_RUN
from trainer.__main__ import main as trainer_main
from trainer.artifacts import load_artifacts
from trainer.config import load_config
from trainer.data import history_batch, load_dataset, split_positions, target_windows
from trainer.model import ModelConfig, SequenceConfig
from trainer.pipeline import evaluate_artifacts, run_training
from trainer.sequence import SequenceTower
from trainer.step import make_window_batch
from trainer.train import Trainer

SEQ_RUN = [*TINY_RUN, "model.tower=sequence", "batch_size=32", "data.max_history=12"]


def tower(seed: int = 0, **seq) -> SequenceTower:
    torch.manual_seed(seed)
    cfg = ModelConfig(tower="sequence", embedding_dim=16, sequence=SequenceConfig(heads=2, **seq))
    return SequenceTower(cfg, {"segment": 5}, max_history=10).eval()


def rows_and_ids(seed: int, batch: int = 4, length: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, 16, generator=g), torch.randint(
        0, 50, (batch, length), generator=g
    )


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_a_position_does_not_see_later_items(norm):
    net = tower(norm=norm)
    rows, ids = rows_and_ids(1)
    feats = {"segment": torch.tensor([0, 1, 2, 3])}
    out = net(rows, ids, feats, all_positions=True)  # [B, L, D]
    for t in (0, 4, 8):
        later_rows, later_ids = rows.clone(), ids.clone()
        later_rows[:, t + 1 :] = torch.randn_like(later_rows[:, t + 1 :]) * 3
        later_ids[:, t + 1 :] = (later_ids[:, t + 1 :] + 7) % 50
        changed = net(later_rows, later_ids, feats, all_positions=True)
        torch.testing.assert_close(changed[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(changed[:, t + 1 :], out[:, t + 1 :], atol=1e-3)


def test_padding_does_not_leak_and_either_side_gives_the_same_vector():
    net = tower()
    rows, ids = rows_and_ids(2, batch=3, length=6)
    feats = {"segment": torch.tensor([1, 2, 3])}
    base = net(rows, ids, feats)  # [B, D], no padding
    pad = 4
    for side in ("left", "right"):
        g = torch.Generator().manual_seed(3)
        junk = torch.randn(3, pad, 16, generator=g) * 10  # padded rows: any value
        none = torch.full((3, pad), -1)
        if side == "left":
            padded_rows, padded_ids = torch.cat([junk, rows], 1), torch.cat([none, ids], 1)
        else:
            padded_rows, padded_ids = torch.cat([rows, junk], 1), torch.cat([ids, none], 1)
        torch.testing.assert_close(net(padded_rows, padded_ids, feats), base, rtol=0, atol=1e-5)
    # rows of different lengths in one batch: each as if alone
    ragged = ids.clone()
    ragged[0, :3] = -1
    alone = net(rows[:1, 3:], ids[:1, 3:], {"segment": feats["segment"][:1]})
    torch.testing.assert_close(net(rows, ragged, feats)[:1], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("padding", ["none", "left", "ragged"])
def test_the_last_position_alone_equals_the_last_of_every_position(norm, padding):
    """Inference computes only the last position in the last block (a slice when every row
    ends at the last column, a gather when rows end elsewhere): the same vectors as every
    position's pass, read at each row's last item."""
    net = tower(seed=4, norm=norm, blocks=3)
    rows, ids = rows_and_ids(5, batch=5)
    if padding == "left":
        ids[:, :3] = -1
    elif padding == "ragged":  # right-padded rows of different lengths, one empty
        for r, n in enumerate((10, 7, 1, 0, 4)):
            ids[r, n:] = -1
    feats = {"segment": torch.tensor([0, 1, 2, 3, 4])}
    every = net(rows, ids, feats, all_positions=True)  # [B, L, D]
    last = ((ids >= 0).long() * torch.arange(10)).amax(1)
    expected = every[torch.arange(5), last]
    torch.testing.assert_close(net(rows, ids, feats), expected, rtol=0, atol=1e-5)


def test_split_holds_out_what_the_setting_says():
    offsets = np.array([0, 2, 5, 9], dtype=np.int64)  # users of 2, 3 and 4 interactions
    train, valid, test = split_positions(offsets, "test")
    assert train.tolist() == [6] and valid.tolist() == [3, 7] and test.tolist() == [1, 4, 8]
    train, valid, test = split_positions(offsets, "valid")
    assert train.tolist() == [3, 6, 7] and valid.tolist() == [1, 4, 8] and test.size == 0
    train, valid, test = split_positions(offsets, "none")
    assert train.tolist() == [1, 3, 4, 6, 7, 8] and valid.size == 0 and test.size == 0


def trained_targets(trainer: Trainer) -> np.ndarray:
    """The target positions one epoch of ``trainer`` trains on (every batch it draws)."""
    order, bs, got = trainer.epoch_order(0), trainer.cfg.batch_size, []
    for b in range(0, len(order), bs):
        units = order[b : b + bs]
        batch, _ = trainer.draw_batch(units)
        if batch.target_mask is None:
            pos = units
        else:
            counts = trainer.window_counts[np.searchsorted(trainer.units, units)]
            pos = np.concatenate([np.arange(e - c + 1, e + 1) for e, c in zip(units, counts)])
        assert len(batch) == trainer.examples_in(units) == len(pos)
        assert np.array_equal(batch.targets.numpy(), trainer.ds.seq.items[pos])
        got.append(pos)
    return np.sort(np.concatenate(got))


@pytest.mark.parametrize(
    "tower_args",
    [
        ["model.tower=mean"],
        ["model.tower=sequence"],
        ["model.tower=sequence", "model.sequence.window_targets=3"],
    ],
    ids=["mean", "sequence", "sequence-overlapping-windows"],
)
def test_default_split_trains_on_no_held_out_row_and_none_on_every_row(tmp_path, tower_args):
    base = [*TINY_RUN, *tower_args, "data.max_history=8", f"out_dir={tmp_path}"]
    held = Trainer(load_config(None, base))
    ds = held.ds
    got = trained_targets(held)
    assert np.array_equal(got, ds.train_positions)  # each training target once an epoch
    assert not np.isin(got, np.concatenate([ds.valid_positions, ds.test_positions])).any()
    refit = Trainer(load_config(None, [*base, "data.holdout=none"]))
    got = trained_targets(refit)
    seq = refit.ds.seq
    firsts = seq.offsets[:-1]
    assert len(refit.ds.valid_positions) == len(refit.ds.test_positions) == 0
    # every row is a target except each user's first, which is only ever history
    assert np.array_equal(got, np.setdiff1d(np.arange(len(seq)), firsts))
    assert len(got) == len(seq) - refit.ds.num_users


def test_windows_keep_targets_of_one_user_and_their_history():
    ds = load_dataset(load_config(None, [*TINY_RUN, "data.max_history=5"]).data)
    ends, counts = target_windows(ds.seq, ds.train_positions, 5)
    assert counts.max() == 5 and counts.min() >= 1
    batch = make_window_batch(ds, ends[:20], counts[:20])
    hist, _ = history_batch(ds.seq, ends[:20], 5)
    assert np.array_equal(batch.history.numpy(), hist)
    # the output at a target column predicts the item after that column's history item
    rows, cols = np.nonzero(batch.target_mask.numpy())
    positions = ends[:20][rows] - (4 - cols)
    assert np.array_equal(ds.seq.user_of(positions), ds.seq.user_of(ends[:20][rows]))
    assert np.array_equal(batch.targets.numpy(), ds.seq.items[positions])
    assert np.array_equal(hist[rows, cols], ds.seq.items[positions - 1])


@pytest.fixture(scope="module")
def sequence_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq")
    cfg = load_config(None, [*SEQ_RUN, "epochs=2", "patience=5", f"out_dir={out}"])
    return cfg, run_training(cfg)


def test_exported_encoder_gives_the_trainers_user_vectors(sequence_run):
    cfg, path = sequence_run
    art = load_artifacts(path)
    assert art.manifest["holdout"] == "test" and "model" in art.manifest["metrics"]
    trainer = Trainer(cfg)
    trainer.load_best()
    trainer.tower.eval()
    ends, counts = trainer.units[:40], trainer.window_counts[:40]
    batch = make_window_batch(trainer.ds, ends, counts)
    inp = trainer.store.full_tables()["input"]
    with torch.no_grad():
        out = trainer.tower(
            inp[batch.history.clamp(min=0)], batch.history, batch.user_features, None, True
        )[batch.target_mask]  # the training forward: every target position at once
    # what the trainer's output at column j saw: the window's items up to column j
    rows, cols = np.nonzero(batch.target_mask.numpy())
    window = batch.history.numpy()
    histories = [[int(i) for i in window[r, : c + 1] if i >= 0] for r, c in zip(rows, cols)]
    users = trainer.ds.seq.user_of(ends[rows])
    codes = {n: v[users] for n, v in art.user_features.items()}
    served = art.encoder.encode(histories, codes)
    torch.testing.assert_close(served, out, rtol=0, atol=1e-5)
    # a window's last target saw the whole history before it, as the service reads it
    last = cols == cfg.data.max_history - 1
    assert last.sum() > 10
    full, _ = history_batch(trainer.ds.seq, ends[rows[last]], cfg.data.max_history)
    assert [[int(i) for i in h if i >= 0] for h in full] == [
        h for h, is_last in zip(histories, last) if is_last
    ]


def test_refit_takes_the_best_epoch_and_says_there_are_no_test_metrics(
    sequence_run, tmp_path, capsys
):
    _, selected = sequence_run
    best = json.loads((selected / "manifest.json").read_text())["metrics"]["best_epoch"]
    out = tmp_path / "refit"
    args = [*SEQ_RUN, "data.holdout=none", f"epochs_from={selected.parent}", "epochs=9"]
    assert trainer_main(["train", *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no test metrics: data.holdout=none" in printed and "epochs_from" in printed
    art = load_artifacts(out / "artifacts")
    assert art.manifest["holdout"] == "none"
    assert art.manifest["metrics"]["epochs"] == best and "model" not in art.manifest["metrics"]
    assert art.config.data.holdout == "none"
    with pytest.raises(ValueError, match="no test split"):
        evaluate_artifacts(out / "artifacts")
    bad = load_config(None, [*SEQ_RUN, f"epochs_from={tmp_path / 'nothing'}"])
    with pytest.raises(ValueError, match=r"epochs_from=.*run directory"):
        run_training(bad)


def test_sequence_config_trains_on_a_plain_interactions_file(tmp_path):
    """configs/sequence.yaml as a user with their own file runs it: columns user_id, item_id,
    timestamp, every interaction trained on, artifacts that encode."""
    rng = np.random.default_rng(5)
    users = np.repeat(np.arange(60), 8)
    items = (users * 7 + np.tile(np.arange(8), 60)) % 40  # each user walks the catalogue
    ts = 1_700_000_000 + np.arange(len(users)) * 60
    order = rng.permutation(len(users))  # file order is not time order
    path = tmp_path / "events.csv"
    lines = ["user_id,item_id,timestamp"]
    lines += [f"u{users[i]},i{items[i]},{ts[i]}" for i in order]
    path.write_text("\n".join(lines) + "\n")
    cfg = load_config(
        "configs/sequence.yaml",
        [
            f"data.path={path}",
            "epochs=2",
            "batch_size=16",
            "loss.num_sampled=16",
            "model.embedding_dim=16",
            "progress=false",
            "num_threads=1",
            f"out_dir={tmp_path / 'run'}",
        ],
    )
    assert cfg.model.tower == "sequence" and cfg.data.holdout == "none"
    art = load_artifacts(run_training(cfg))
    assert art.manifest["holdout"] == "none" and art.manifest["metrics"]["epochs"] == 2
    assert art.num_items == 40 and len(art.user_ids) == 60
    row = art.item_index()
    vec = art.encoder.encode([[row["i3"], row["i4"]]])
    assert vec.shape == (1, 16) and torch.isfinite(vec).all()


def test_validation_only_holdout_selects_on_the_last_item_and_has_no_test(tmp_path):
    cfg = load_config(None, [*TINY_RUN, "data.holdout=valid", "epochs=2", f"out_dir={tmp_path}"])
    ds = load_dataset(cfg.data)
    firsts, lasts = ds.seq.offsets[:-1], ds.seq.offsets[1:] - 1
    assert np.array_equal(ds.valid_positions, lasts) and len(ds.test_positions) == 0
    assert np.array_equal(
        ds.train_positions, np.setdiff1d(np.arange(len(ds.seq)), np.concatenate([firsts, lasts]))
    )
    art = load_artifacts(run_training(cfg, dataset=ds))
    assert art.manifest["holdout"] == "valid" and "model" not in art.manifest["metrics"]
    curves = (art.path / "curves.csv").read_text()
    assert "HR@10" in curves.splitlines()[0]  # validated (and early-stopped) every epoch
