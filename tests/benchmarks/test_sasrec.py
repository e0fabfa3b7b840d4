"""benchmarks.sasrec: the peer's training sequences are our split; its sampler and scores."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks import sasrec
from benchmarks.vendor.sasrec_pmixer import SASRec
from trainer.data import history_batch


def test_sequences_hold_exactly_our_training_targets(ds):
    seqs = sasrec.user_sequences(ds)
    np.testing.assert_array_equal(np.sort(seqs.targets()), ds.train_positions)
    for u, items, start in zip(seqs.users, seqs.items, seqs.starts):
        assert start == ds.seq.offsets[u]
        n = ds.seq.lengths()[u]  # the last two (validation, test) are never in it
        np.testing.assert_array_equal(items, ds.seq.items[start : start + n - 2] + 1)


def test_sample_batch_is_upstreams_shifted_sequence_with_outside_negatives():
    items = [np.array([5, 3, 9, 4]), np.arange(1, 30)]
    seq, pos, neg = sasrec.sample_batch(items, 6, 40, np.random.default_rng(0))
    np.testing.assert_array_equal(seq[0], [0, 0, 0, 5, 3, 9])
    np.testing.assert_array_equal(pos[0], [0, 0, 0, 3, 9, 4])
    np.testing.assert_array_equal(seq[1], np.arange(23, 29))  # the last 6 inputs
    np.testing.assert_array_equal(pos[1], np.arange(24, 30))
    assert ((neg == 0) == (pos == 0)).all()
    assert not np.isin(neg[0][neg[0] > 0], items[0]).any()
    assert (neg[1] >= 30).all() and (neg <= 40).all()  # items 1..29 are the user's own
    again = sasrec.sample_batch(items, 6, 40, np.random.default_rng(0))
    np.testing.assert_array_equal(again[2], neg)


def test_scores_are_the_last_positions_dot_every_item_in_our_order(ds):
    torch.manual_seed(0)
    model = SASRec(ds.num_users, ds.num_items, sasrec.SASRecArgs(maxlen=ds.max_history))
    sasrec.init_like_upstream(model)
    assert not model.item_emb.weight[0].any() and not model.pos_emb.weight[0].any()
    model.eval()
    pos = ds.test_positions[:7]
    scores = sasrec.score_function(model, ds, ds.max_history)(pos)
    assert scores.shape == (7, ds.num_items)
    hist, _ = history_batch(ds.seq, pos, ds.max_history)
    with torch.no_grad():
        user = model.log2feats(hist + 1)[:, -1]
        expected = user @ model.item_emb.weight[1:].T  # upstream id i + 1 is our item i
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_training_improves_on_an_untrained_model(ds):
    from trainer import metrics

    run = sasrec.train_sasrec(ds, 0, epochs=6, eval_every=3, patience=2)
    assert run.epochs == 6 and run.best_epoch in (3, 6)
    assert run.examples == 6 * len(ds.train_positions)
    trained = metrics.evaluate(ds, run.score_fn, "valid", ks=(10,))["filtered"]["NDCG@10"]
    torch.manual_seed(0)
    model = SASRec(ds.num_users, ds.num_items, sasrec.SASRecArgs(maxlen=ds.max_history))
    sasrec.init_like_upstream(model)
    model.eval()
    fn = sasrec.score_function(model, ds, ds.max_history)
    untrained = metrics.evaluate(ds, fn, "valid", ks=(10,))["filtered"]["NDCG@10"]
    assert trained > untrained
