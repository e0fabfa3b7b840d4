"""Differential tests against TensorFlow (``tf.compat.v1.nn`` losses, ``tf.random`` samplers).

The same ``sampled_values`` are fed to both sides, so losses and gradients must agree to
float32 rounding. The samplers are compared through their expected-count formulas on
TensorFlow's own draws (the random streams differ by design).
"""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import torch

import sampler
from tests.sampler import reference as ref
from tests.sampler.cases import loss_kwargs, make_case, reference_loss

pytestmark = pytest.mark.parity

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def tf():
    tf = pytest.importorskip("tensorflow")
    # keep TensorFlow off the GPU that the torch tests use (RuntimeError: already initialised)
    with contextlib.suppress(RuntimeError):
        tf.config.set_visible_devices([], "GPU")
    return tf


def _table(a, parameter: bool) -> torch.Tensor:
    """A trainable table: an nn.Parameter (the losses' default: sparse gradients) or a tensor."""
    t = torch.tensor(a)
    return torch.nn.Parameter(t) if parameter else t.requires_grad_()


def _torch_weights(case, num_shards, strategy, parameter=False):
    w = case.weight_shards(num_shards, strategy)
    if isinstance(w, list):
        return [_table(s, parameter) for s in w]
    return _table(w, parameter)


def _leaves(w):
    return w if isinstance(w, list) else [w]


def ours_loss_and_grads(kind, case, num_shards, strategy, remove, parameter=False):
    w = _torch_weights(case, num_shards, strategy, parameter)
    b = _table(case.biases, parameter)
    x = torch.tensor(case.inputs, requires_grad=True)
    sv = sampler.SampledValues(*(torch.from_numpy(v) for v in case.sampled_values))
    fn = sampler.sampled_softmax_loss if kind == "softmax" else sampler.nce_loss
    loss = fn(
        **loss_kwargs(
            case,
            torch.from_numpy,
            w,
            b,
            x,
            sampled_values=sv,
            remove_accidental_hits=remove,
            partition_strategy=strategy,
        )
    )
    (loss * torch.from_numpy(case.upstream)).sum().backward()
    assert all(t.grad.is_sparse == parameter for t in [*_leaves(w), b])
    return {
        "loss": loss.detach().numpy(),
        "weights": [t.grad.to_dense().numpy() for t in _leaves(w)],
        "biases": b.grad.to_dense().numpy(),
        "inputs": x.grad.numpy(),
    }


def tf_loss_and_grads(tf, kind, case, num_shards, strategy, remove):
    w_np = case.weight_shards(num_shards, strategy)
    w_list = [tf.constant(s) for s in (w_np if isinstance(w_np, list) else [w_np])]
    w_arg = w_list if isinstance(w_np, list) else w_list[0]
    b = tf.constant(case.biases)
    x = tf.constant(case.inputs)
    fn = tf.compat.v1.nn.sampled_softmax_loss if kind == "softmax" else tf.compat.v1.nn.nce_loss
    with tf.GradientTape() as tape:
        tape.watch([*w_list, b, x])
        loss = fn(
            **loss_kwargs(
                case,
                tf.constant,
                w_arg,
                b,
                x,
                remove_accidental_hits=remove,
                partition_strategy=strategy,
            )
        )
        total = tf.reduce_sum(loss * tf.constant(case.upstream))
    grads = tape.gradient(total, [*w_list, b, x])
    grads = [tf.convert_to_tensor(g).numpy() for g in grads]
    return {
        "loss": loss.numpy(),
        "weights": grads[: len(w_list)],
        "biases": grads[-2],
        "inputs": grads[-1],
    }


LAYOUTS = [(0, "mod"), (3, "mod"), (3, "div")]  # 0: a single tensor; 3 shards of 50 rows: 17/17/16


@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize("num_true", [1, 2, 3, 4])
@pytest.mark.parametrize(("num_shards", "strategy"), LAYOUTS)
@pytest.mark.parametrize("remove", [True, False])
@pytest.mark.parametrize("unique", [True, False])
@pytest.mark.parametrize("parameter", [False, True], ids=["tensor", "parameter"])
def test_loss_and_grads_match_tf(
    tf, kind, num_true, num_shards, strategy, remove, unique, parameter
):
    """Plain tensors (dense gradients) and the default path for nn.Parameter tables (sparse)."""
    case = make_case(100 * num_true + 7 * unique + num_shards, num_true, unique=unique)
    assert case.num_hits() >= 3, "the case must contain accidental hits"
    got = ours_loss_and_grads(kind, case, num_shards, strategy, remove, parameter)
    want = tf_loss_and_grads(tf, kind, case, num_shards, strategy, remove)
    assert np.all(np.isfinite(got["loss"]))
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["inputs"], want["inputs"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["biases"], want["biases"], rtol=RTOL, atol=ATOL)
    assert len(got["weights"]) == len(want["weights"])
    for g, w in zip(got["weights"], want["weights"]):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize("strategy", ["mod", "div"])
def test_reference_matches_tf(tf, kind, strategy):
    """The NumPy reference used by test_losses.py agrees with TensorFlow too."""
    case = make_case(5, 3, unique=False)
    r = reference_loss(kind, case, 3, strategy, remove=True)
    t = tf_loss_and_grads(tf, kind, case, 3, strategy, True)
    np.testing.assert_allclose(r["loss"], t["loss"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(r["inputs"], t["inputs"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(r["biases"][0], t["biases"], rtol=RTOL, atol=ATOL)
    for a, b in zip(r["weights"], t["weights"]):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("num_true", [1, 3])
@pytest.mark.parametrize("remove", [True, False])
@pytest.mark.parametrize(("num_shards", "strategy"), LAYOUTS)
def test_compute_sampled_logits_matches_tf(tf, num_true, remove, num_shards, strategy):
    from tensorflow.python.ops.nn_impl import _compute_sampled_logits

    case = make_case(11 + num_true, num_true, unique=False)
    w_np = case.weight_shards(num_shards, strategy)
    options = dict(remove_accidental_hits=remove, partition_strategy=strategy)
    w_tf = [tf.constant(s) for s in w_np] if isinstance(w_np, list) else tf.constant(w_np)
    want_logits, want_labels = _compute_sampled_logits(
        **loss_kwargs(case, tf.constant, w_tf, **options)
    )
    w_t = [torch.from_numpy(s) for s in w_np] if isinstance(w_np, list) else torch.from_numpy(w_np)
    logits, labels = sampler.compute_sampled_logits(
        **loss_kwargs(case, torch.from_numpy, w_t, **options)
    )
    want_logits, logits = want_logits.numpy(), logits.numpy()
    np.testing.assert_array_equal(labels.numpy(), want_labels.numpy())
    masked = want_logits <= -1e30
    expected_mask = np.zeros_like(masked)
    if remove:
        expected_mask[:, num_true:] = ref.accidental_hit_mask(case.labels, case.sampled, num_true)
        assert expected_mask.sum() >= 3
    np.testing.assert_array_equal(masked, expected_mask)
    np.testing.assert_array_equal(logits <= -1e30, masked)
    np.testing.assert_allclose(logits[~masked], want_logits[~masked], rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# embedding_lookup and compute_accidental_hits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["mod", "div"])
@pytest.mark.parametrize(("num_rows", "num_shards"), [(50, 3), (10, 4), (7, 1), (9, 3)])
@pytest.mark.parametrize("max_norm", [None, 0.7])
def test_embedding_lookup_matches_tf(tf, strategy, num_rows, num_shards, max_norm):
    rng = np.random.default_rng(num_rows * 10 + num_shards)
    table = rng.normal(size=(num_rows, 4)).astype(np.float32)
    bias = rng.normal(size=num_rows).astype(np.float32)
    ids = rng.integers(0, num_rows, (5, 3)).astype(np.int64)
    ids[0, :] = ids[1, 0]  # duplicates
    for params in (table, bias):
        shards = ref.split_rows(params, num_shards, strategy)
        want = tf.compat.v1.nn.embedding_lookup(
            [tf.constant(s) for s in shards],
            tf.constant(ids),
            partition_strategy=strategy,
            max_norm=max_norm,
        ).numpy()
        got = sampler.embedding_lookup(
            [torch.from_numpy(s) for s in shards],
            torch.from_numpy(ids),
            partition_strategy=strategy,
            max_norm=max_norm,
        ).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("strategy", ["mod", "div"])
@pytest.mark.parametrize("max_norm", [None, 1.1])
def test_embedding_lookup_gradient_matches_tf(tf, strategy, max_norm):
    rng = np.random.default_rng(3)
    table = rng.normal(size=(10, 3)).astype(np.float32)
    ids = np.array([[1, 1, 9], [0, 4, 1]], dtype=np.int64)
    up = rng.normal(size=(2, 3, 3)).astype(np.float32)
    shards = ref.split_rows(table, 4, strategy)
    tf_shards = [tf.constant(s) for s in shards]
    with tf.GradientTape() as tape:
        tape.watch(tf_shards)
        out = tf.compat.v1.nn.embedding_lookup(
            tf_shards, tf.constant(ids), partition_strategy=strategy, max_norm=max_norm
        )
        total = tf.reduce_sum(out * up)
    want = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(total, tf_shards)]
    t_shards = [torch.tensor(s, requires_grad=True) for s in shards]
    got = sampler.embedding_lookup(t_shards, torch.from_numpy(ids), strategy, max_norm)
    (got * torch.from_numpy(up)).sum().backward()
    np.testing.assert_allclose(got.detach().numpy(), out.numpy(), rtol=1e-6, atol=1e-7)
    for t, w in zip(t_shards, want):
        np.testing.assert_allclose(t.grad.numpy(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_true", [1, 2, 4])
def test_compute_accidental_hits_matches_tf(tf, seed, num_true):
    rng = np.random.default_rng(seed)
    sampled = rng.integers(0, 12, 15).astype(np.int64)  # many repeats
    labels = rng.integers(0, 12, (6, num_true)).astype(np.int64)
    labels[0, :] = sampled[3]  # a repeated true class that is sampled
    want = tf.nn.compute_accidental_hits(tf.constant(labels), tf.constant(sampled), num_true)
    got = sampler.compute_accidental_hits(
        torch.from_numpy(labels), torch.from_numpy(sampled), num_true
    )
    assert len(want[0].numpy()) > 0
    for g, w, dtype in zip(got, want, (torch.int32, torch.int64, torch.float32)):
        assert g.dtype == dtype
        np.testing.assert_array_equal(g.numpy(), w.numpy())
    # and the reference agrees with TensorFlow
    for r, w in zip(ref.compute_accidental_hits(labels, sampled, num_true), want):
        np.testing.assert_array_equal(r, w.numpy())


# ----------------------------------------------------------------------------------------------
# Samplers: our probability / expected-count formulas on TensorFlow's draws
# ----------------------------------------------------------------------------------------------

F32_RTOL = 3e-7  # float32 rounding (about 2 ulp)


def _tf_sample(tf, op, labels, num_true, num_sampled, unique, range_max, seed, **kw):
    out = op(
        true_classes=tf.constant(labels),
        num_true=num_true,
        num_sampled=num_sampled,
        unique=unique,
        range_max=range_max,
        seed=seed,
        **kw,
    )
    return [o.numpy() for o in out]


def _infer_num_tries(p, ec, num_sampled, limit=100_000):
    """The num_tries for which TF's expected-count formula gives ``ec`` from ``p``."""
    for t in range(num_sampled, limit):
        if np.allclose(ref.expected_count(p, num_sampled, t), ec, rtol=F32_RTOL, atol=0):
            return t
    return None


def _check_expected_counts(sampler_obj, labels, sampled, tec, sec, num_sampled, unique):
    p_s = sampler_obj.probability(torch.from_numpy(sampled)).numpy()
    p_t = sampler_obj.probability(torch.from_numpy(labels)).numpy()
    assert p_s.dtype == np.float32
    if unique:
        assert len(set(sampled.tolist())) == num_sampled
        num_tries = _infer_num_tries(p_s, sec, num_sampled)
        assert num_tries is not None, "no num_tries reproduces TF's sampled_expected_count"
    else:
        num_tries = num_sampled
    np.testing.assert_allclose(
        ref.expected_count(p_s, num_sampled, num_tries), sec, rtol=F32_RTOL, atol=0
    )
    np.testing.assert_allclose(
        ref.expected_count(p_t, num_sampled, num_tries), tec, rtol=F32_RTOL, atol=0
    )
    return num_tries


@pytest.mark.parametrize("unique", [False, True])
@pytest.mark.parametrize("range_max", [50, 1000, 2**40])
@pytest.mark.parametrize("kind", ["uniform", "log_uniform"])
def test_range_sampler_expected_counts_match_tf(tf, unique, range_max, kind):
    labels = np.array([[0, 1], [7, 3], [range_max - 1, 5]], dtype=np.int64)
    op = {
        "uniform": tf.random.uniform_candidate_sampler,
        "log_uniform": tf.random.log_uniform_candidate_sampler,
    }[kind]
    cls = {"uniform": sampler.UniformSampler, "log_uniform": sampler.LogUniformSampler}[kind]
    s = 20
    sampled, tec, sec = _tf_sample(tf, op, labels, 2, s, unique, range_max, seed=3)
    assert sampled.max() < range_max
    _check_expected_counts(cls(range_max), labels, sampled, tec, sec, s, unique)
    if not unique:  # TF's shortcut p * S exactly
        np.testing.assert_array_equal(
            sec, ref.expected_count(cls(range_max).probability(torch.from_numpy(sampled)), s, s)
        )


@pytest.mark.parametrize("unique", [False, True])
def test_learned_unigram_expected_counts_match_tf(tf, unique):
    labels = np.array([[0], [4], [4], [9]], dtype=np.int64)
    sampled, tec, sec = _tf_sample(
        tf, tf.random.learned_unigram_candidate_sampler, labels, 1, 6, unique, 10, seed=5
    )
    # First call: all counts are 1, the update happens after the expected counts.
    _check_expected_counts(sampler.LearnedUnigramSampler(10), labels, sampled, tec, sec, 6, unique)


@pytest.mark.parametrize("unique", [False, True])
def test_learned_unigram_updates_match_tf(tf, unique):
    """TF's eager kernel keeps its counts across calls; ours keeps them in ``state``.
    range_max 13 / num_sampled 7 / seed 4321 + unique are used by no other test, so the TF
    kernel (cached per attribute set) starts fresh."""
    state = sampler.LearnedUnigramSampler(13)
    batches = [[[0, 4], [4, 4]], [[12, 1], [4, 0]], [[7, 7], [7, 7]], [[3, 2], [1, 0]]]
    for labels in batches:
        labels = np.asarray(labels, dtype=np.int64)
        sampled, tec, sec = _tf_sample(
            tf, tf.random.learned_unigram_candidate_sampler, labels, 2, 7, unique, 13, 4321
        )
        _check_expected_counts(state, labels, sampled, tec, sec, 7, unique)
        state.sample(torch.from_numpy(labels), 2, 7, unique, 0)  # our update for this batch
    assert state.counts.sum().item() == 13 + 4 * len(batches)


@pytest.mark.parametrize(
    ("distortion", "num_reserved_ids", "num_shards", "shard"),
    [(1.0, 0, 1, 0), (0.75, 3, 1, 0), (0.5, 3, 2, 0), (0.75, 3, 2, 1), (1.3, 4, 3, 2)],
)
@pytest.mark.parametrize("unique", [False, True])
@pytest.mark.parametrize("source", ["unigrams", "vocab_file"])
def test_fixed_unigram_expected_counts_match_tf(
    tf, tmp_path, distortion, num_reserved_ids, num_shards, shard, unique, source
):
    rng = np.random.default_rng(num_reserved_ids + 10 * shard)
    unigrams = [float(u) for u in rng.integers(1, 100, 23)]
    weights, _ = ref.fixed_unigram_weights(
        unigrams, distortion, num_reserved_ids, num_shards, shard
    )
    range_max = len(weights)
    kw = {
        "distortion": distortion,
        "num_reserved_ids": num_reserved_ids,
        "num_shards": num_shards,
        "shard": shard,
    }
    if source == "vocab_file":
        path = tmp_path / "vocab.csv"
        path.write_text("".join(f"word{i},{u:g}\n" for i, u in enumerate(unigrams)))
        kw["vocab_file"] = str(path)
    else:
        kw["unigrams"] = unigrams
    # true classes with non-zero weight (a reserved id would give log(0) in the losses)
    nz = np.flatnonzero(weights > 0)
    labels = nz[[0, 1, -1, 2]].reshape(2, 2).astype(np.int64)
    s = 5
    sampled, tec, sec = _tf_sample(
        tf, tf.random.fixed_unigram_candidate_sampler, labels, 2, s, unique, range_max, 9, **kw
    )
    assert np.all(weights[sampled] > 0), "TF never samples a zero-weight id"
    ours = sampler.FixedUnigramSampler(range_max, **kw)
    _check_expected_counts(ours, labels, sampled, tec, sec, s, unique)
    # and through the functional API with TF's labels
    got = sampler.fixed_unigram_candidate_sampler(
        torch.from_numpy(labels), 2, s, unique, range_max, seed=0, **kw
    )
    assert got.sampled_candidates.max() < range_max


def test_fixed_unigram_reference_weights_match_tf(tf):
    """Our NumPy reference of the weight table (reserved ids, shards, distortion) is TF's."""
    unigrams = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0]
    for num_shards, shard, reserved in [(2, 0, 3), (2, 1, 3), (3, 1, 2), (1, 0, 2)]:
        weights, total = ref.fixed_unigram_weights(unigrams, 0.8, reserved, num_shards, shard)
        labels = np.arange(len(weights), dtype=np.int64).reshape(1, -1)
        _, tec, _ = _tf_sample(
            tf,
            tf.random.fixed_unigram_candidate_sampler,
            labels,
            len(weights),
            1,
            False,
            len(weights),
            1,
            unigrams=unigrams,
            distortion=0.8,
            num_reserved_ids=reserved,
            num_shards=num_shards,
            shard=shard,
        )
        np.testing.assert_allclose(tec[0], weights / total, rtol=F32_RTOL, atol=0)


def test_all_candidate_sampler_matches_tf(tf):
    labels = np.array([[1, 2], [3, 0]], dtype=np.int64)
    want = tf.random.all_candidate_sampler(tf.constant(labels), 2, 7, True)
    got = sampler.all_candidate_sampler(torch.from_numpy(labels), 2, 7, True)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w.numpy())
