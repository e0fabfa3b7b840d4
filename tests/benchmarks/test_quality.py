"""benchmarks.quality and benchmarks.peer: the split handed to the peer, the rows, the table."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks import peer, quality
from tests.benchmarks.data import SYNTHETIC, tiny_dataset
from trainer.data import history_batch
from trainer.metrics import metrics_from_ranks


def test_atomic_rows_are_our_sequences_in_order(ds):
    atomic = peer.atomic_interactions(ds)
    for u in (0, 7, ds.num_users - 1):
        lo, hi = ds.seq.offsets[u], ds.seq.offsets[u + 1]
        assert (atomic.users[lo:hi] == u).all()
        np.testing.assert_array_equal(atomic.items[lo:hi], ds.seq.items[lo:hi])
        np.testing.assert_array_equal(atomic.ranks[lo:hi], np.arange(hi - lo))
    np.testing.assert_array_equal(
        peer.positions_of(ds, atomic.users, atomic.ranks), np.arange(len(ds.seq))
    )
    with pytest.raises(ValueError, match="outside"):
        peer.positions_of(ds, atomic.users[:1], np.array([ds.seq.lengths()[0]]))


def test_leave_one_out_on_the_atomic_rows_is_our_split(ds):
    """RecBole's rule (per user, time order: last = test, one before = valid, every earlier
    position with a history = train), applied to the atomic rows, gives our positions."""
    atomic = peer.atomic_interactions(ds)
    split = {"train": [], "valid": [], "test": []}
    for row in range(len(atomic.users)):
        n = ds.seq.lengths()[atomic.users[row]]
        r = atomic.ranks[row]
        if r == n - 1:
            split["test"].append(row)
        elif r == n - 2:
            split["valid"].append(row)
        elif r >= 1:
            split["train"].append(row)
    for name, rows in split.items():
        pos = peer.positions_of(ds, atomic.users[rows], atomic.ranks[rows])
        np.testing.assert_array_equal(np.sort(pos), ds.positions(name))


def test_recbole_history_is_ours_left_aligned(ds):
    rng = np.random.default_rng(0)
    pos = rng.choice(ds.test_positions, 40, replace=False)
    hist, lengths = history_batch(ds.seq, pos, ds.max_history)
    rb_id = rng.permutation(ds.num_items) + 1  # any 1-based mapping
    seq, length = peer.to_recbole_history(hist, lengths, rb_id)
    np.testing.assert_array_equal(length, lengths)
    for i, p in enumerate(pos):
        start = max(ds.seq.offsets[ds.seq.user_of([p])[0]], p - ds.max_history)
        expected = rb_id[ds.seq.items[start:p]]
        np.testing.assert_array_equal(seq[i, : len(expected)], expected)
        assert (seq[i, len(expected) :] == 0).all()


def test_atomic_file_round_trips(ds, tmp_path):
    atomic = peer.atomic_interactions(ds)
    path = tmp_path / "x" / "x.inter"
    peer.write_atomic(atomic, path)
    lines = path.read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    back = np.loadtxt(path, skiprows=1, dtype=np.int64)
    np.testing.assert_array_equal(back, np.stack([atomic.users, atomic.items, atomic.ranks], 1))


def test_popularity_row_matches_a_direct_count(ds):
    """Rank of each test target by training popularity, the user's earlier items excluded."""
    run = quality.run_popularity(ds)
    pop = ds.items.popularity.astype(np.float64)
    ranks = []
    for p in ds.test_positions:
        u = ds.seq.user_of([p])[0]
        seen = set(ds.seq.items[ds.seq.offsets[u] : p].tolist()) - {ds.seq.items[p]}
        higher = pop > pop[ds.seq.items[p]]
        higher[list(seen)] = False
        ranks.append(int(higher.sum()))
    expected = metrics_from_ranks(np.array(ranks), quality.KS)
    for key in quality.COLUMNS:
        assert run.metrics[key] == pytest.approx(expected[key], abs=1e-12)


def _run(hr, nd, seconds=0.0, train_seconds=0.0, examples=0, epochs=0):
    metrics = {c: hr if c.startswith("HR") else nd for c in quality.COLUMNS}
    return quality.Run(metrics, seconds, train_seconds, examples, epochs)


def test_rows_average_seeds_and_rate_is_examples_over_training_seconds():
    row = quality.Row("m", "id", [_run(0.2, 0.1, 10, 8, 800, 2), _run(0.4, 0.3, 20, 12, 1200, 3)])
    cells = row.cells()
    assert cells[0] == "m"
    assert cells[1] == "0.300" and cells[4] == "0.200"  # HR@10, NDCG@10
    assert cells[-3:] == [pytest.approx(2.5), pytest.approx(15.0), pytest.approx(100.0)]
    assert quality.Row("pop", "id", [_run(0.1, 0.05)]).cells()[-3:] == ["-", "-", "-"]


def test_render_sections_ratios_and_targets():
    rows = {
        "popularity": quality.Row("popularity", "id", [_run(0.1, 0.05)]),
        "mean": quality.Row("mean tower", "id", [_run(0.2, 0.1, 1, 1, 10, 1)]),
        "sequence": quality.Row("seq", "id", [_run(0.26, 0.12, 1, 1, 10, 1)]),
        "sasrec": quality.Row("sasrec", "id", [_run(0.25, 0.13, 1, 1, 10, 1)]),
        "features": quality.Row("featrow", "features", [_run(0.3, 0.2, 1, 1, 10, 1)]),
    }
    text = quality.render("x", "summary", rows, [0])
    id_part, feat_part = text.split("with side features:")
    assert "mean tower" in id_part and "featrow" not in id_part and "| featrow " in feat_part
    assert "* HR@10 sequence / mean: 1.300x (target >= 1.25: met)" in text
    assert "* NDCG@10 sequence / mean: 1.200x (target >= 1.25: missed)" in text
    assert "* NDCG@10 sequence / sasrec: 0.923x (target >= 1: missed)" in text
    assert "sequence-full" not in text  # no full-softmax row, no ratio against it
    assert "* mean, seeds [0]: HR@10 0.200; NDCG@10 0.100" in text


@pytest.mark.skipif(not peer.recbole_available(), reason=f"needs RecBole: {peer.INSTALL}")
def test_recbole_split_is_ours_and_a_different_one_is_caught(ds, tmp_path):
    from recbole.data import create_dataset, data_preparation

    peer.write_atomic(peer.atomic_interactions(ds), tmp_path / "shardrec" / "shardrec.inter")
    cfg = peer.recbole_config(tmp_path, 0, 1, 1, ds.max_history)
    rb = create_dataset(cfg)
    loaders = data_preparation(cfg, rb)
    peer.check_same_split(ds, rb, loaders)  # raises on any difference
    shifted = tiny_dataset(max_history=7)
    with pytest.raises(ValueError, match="test histories differ"):
        peer.check_same_split(shifted, rb, loaders)  # same targets, histories 7 long not 8


def test_benchmark_end_to_end_on_tiny_synthetic_data(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"source": "synthetic", "max_history": 8, "synthetic": SYNTHETIC},
                "model": {"embedding_dim": 16, "hidden": [32]},
                "loss": {"num_sampled": 32},
                "epochs": 2,
                "batch_size": 128,
            }
        )
    )
    models = ["popularity", "mean", "sequence", "features"]
    models += ["sasrec"] if peer.recbole_available() else []
    args = argparse.Namespace(
        models=models, seeds=[0], peer_epochs=2, peer_eval_every=1, peer_patience=1,
        sequence_overrides=[], mean_overrides=[],
    )  # fmt: skip
    text = quality.run_dataset("tiny", str(config), Path(tmp_path), args)
    assert "ID-only (no side features):" in text and "with side features:" in text
    assert "| ours, mean tower, sampled softmax " in text
    assert "| ours, sequence tower, sampled softmax " in text  # model.tower=sequence
    assert f"* sequence: {config} {' '.join(quality.ID_ONLY + quality.SEQUENCE)}" in text
    assert ("| SASRec (RecBole" in text) == peer.recbole_available()
    assert "| popularity " in text and "features-full" not in text
