"""Candidate samplers, compute_accidental_hits, embedding_lookup and routing vs NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import sampler
from sampler import routing
from tests.sampler import reference as ref
from tests.sampler.checks import assert_reused_sampler_reproduces

P_MIN = 1e-3
F32_RTOL = 3e-7


def chisquare_p(observed, probs) -> float:
    """p-value of a chi-square goodness-of-fit test, pooling cells with expected count < 5."""
    observed = np.asarray(observed, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum()
    n = observed.sum()
    assert observed[probs == 0].sum() == 0, "drew an id of probability 0"
    keep = probs > 0
    observed, expected = observed[keep], probs[keep] * n
    order = np.argsort(expected)
    observed, expected = observed[order], expected[order]
    small = np.cumsum(expected) < 5
    if small.any():
        k = int(small.sum()) + 1
        observed = np.concatenate([[observed[:k].sum()], observed[k:]])
        expected = np.concatenate([[expected[:k].sum()], expected[k:]])
    return float(stats.chisquare(observed, expected).pvalue)


def infer_num_tries(p, ec, num_sampled, limit=10_000):
    """The num_tries for which TensorFlow's expected-count formula turns ``p`` into ``ec``."""
    for t in range(num_sampled, limit):
        if np.allclose(ref.expected_count(p, num_sampled, t), ec, rtol=F32_RTOL, atol=0):
            return t
    return None


LABELS = torch.tensor([[0, 3], [1, 1], [4, 2]])


# ----------------------------------------------------------------------------------------------
# unique=False: goodness of fit and p * S expected counts
# ----------------------------------------------------------------------------------------------


def _log_uniform_cell_probs(range_max):
    """Log-uniform probabilities written out independently of the reference."""
    k = np.arange(range_max)
    probs = np.log((k + 2.0) / (k + 1.0)) / np.log(range_max + 1.0)
    np.testing.assert_allclose(probs.sum(), 1.0)
    return probs


DISTRIBUTIONS = {
    # name: (sampler, reference probability, cell probabilities for the goodness of fit)
    "uniform": (sampler.uniform_candidate_sampler, ref.uniform_probability, np.ones),
    "log_uniform": (
        sampler.log_uniform_candidate_sampler,
        ref.log_uniform_probability,
        _log_uniform_cell_probs,
    ),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    ("name", "range_max"),
    [("uniform", 7), ("uniform", 40), ("log_uniform", 5), ("log_uniform", 60)],
)
def test_distribution(seed, name, range_max):
    fn, probability, cell_probs = DISTRIBUTIONS[name]
    s = 20_000
    out = fn(LABELS, 2, s, False, range_max, seed=seed)
    ids = out.sampled_candidates.numpy()
    assert out.sampled_candidates.dtype == torch.int64 and ids.shape == (s,)
    assert ids.min() >= 0 and ids.max() < range_max
    assert chisquare_p(np.bincount(ids, minlength=range_max), cell_probs(range_max)) > P_MIN
    np.testing.assert_array_equal(
        out.sampled_expected_count.numpy(),
        ref.expected_count(probability(ids, range_max), s, s),
    )
    np.testing.assert_array_equal(
        out.true_expected_count.numpy(),
        ref.expected_count(probability(LABELS.numpy(), range_max), s, s),
    )
    assert out.true_expected_count.dtype == torch.float32
    assert out.sampled_expected_count.dtype == torch.float32


FIXED_CONFIGS = [
    # keyword arguments of FixedUnigramSampler and ref.fixed_unigram_weights
    dict(zip(("distortion", "num_reserved_ids", "num_shards", "shard"), values))
    for values in [(1.0, 0, 1, 0), (0.75, 3, 1, 0), (0.5, 3, 2, 1), (1.5, 4, 3, 2), (0.0, 2, 2, 0)]
]
FIXED_IDS = ["-".join(str(v) for v in c.values()) for c in FIXED_CONFIGS]
UNIGRAMS = [float(u) for u in np.random.default_rng(0).integers(1, 60, 25)]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("config", FIXED_CONFIGS, ids=FIXED_IDS)
def test_fixed_unigram_distribution(seed, config):
    weights, total = ref.fixed_unigram_weights(UNIGRAMS, **config)
    range_max = len(weights)
    labels = torch.from_numpy(np.flatnonzero(weights > 0)[:4].reshape(2, 2))
    s = 20_000
    out = sampler.fixed_unigram_candidate_sampler(
        labels, 2, s, False, range_max, unigrams=UNIGRAMS, seed=seed, **config
    )
    ids = out.sampled_candidates.numpy()
    assert ids.min() >= 0 and ids.max() < range_max
    assert chisquare_p(np.bincount(ids, minlength=range_max), weights) > P_MIN
    p = ref.fixed_unigram_probability(ids, weights, total)
    np.testing.assert_allclose(
        out.sampled_expected_count.numpy(), ref.expected_count(p, s, s), rtol=F32_RTOL
    )
    p_t = ref.fixed_unigram_probability(labels.numpy(), weights, total)
    np.testing.assert_allclose(
        out.true_expected_count.numpy(), ref.expected_count(p_t, s, s), rtol=F32_RTOL
    )


@pytest.mark.parametrize("config", FIXED_CONFIGS, ids=FIXED_IDS)
def test_fixed_unigram_probability_table(config):
    weights, total = ref.fixed_unigram_weights(UNIGRAMS, **config)
    s = sampler.FixedUnigramSampler(len(weights), unigrams=UNIGRAMS, **config)
    ids = np.arange(len(weights))
    got = s.probability(torch.from_numpy(ids)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(
        got, ref.fixed_unigram_probability(ids, weights, total), rtol=F32_RTOL
    )
    num_shards, shard = config["num_shards"], config["shard"]
    n_reserved_kept = len([i for i in range(config["num_reserved_ids"]) if i % num_shards == shard])
    assert (got[:n_reserved_kept] == 0).all()


def test_fixed_unigram_shard_counter_quirk():
    """TF numbers the unigrams from the count of reserved ids KEPT in the shard."""
    unigrams = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    # 3 reserved ids over 2 shards: shard 1 keeps reserved id 1 only, so the counter starts
    # at 1 and shard 1 keeps unigrams 0, 2, 4 (word ids 1, 3, 5).
    s = sampler.FixedUnigramSampler(4, num_reserved_ids=3, num_shards=2, shard=1, unigrams=unigrams)
    got = s.probability(torch.arange(4)).numpy()
    np.testing.assert_allclose(got, np.array([0, 1, 3, 5], dtype=np.float32) / 9, rtol=F32_RTOL)


def test_fixed_unigram_vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("".join(f"w{i},x,{u:g}\n" for i, u in enumerate(UNIGRAMS)))
    assert ref.read_vocab_weights(str(path)) == UNIGRAMS
    weights, total = ref.fixed_unigram_weights(UNIGRAMS, 0.75, 2, 2, 1)
    config = dict(vocab_file=str(path), distortion=0.75, num_reserved_ids=2, num_shards=2, shard=1)
    a = sampler.FixedUnigramSampler(len(weights), **config)
    ids = torch.arange(len(weights))
    np.testing.assert_allclose(
        a.probability(ids).numpy(),
        ref.fixed_unigram_probability(ids.numpy(), weights, total),
        rtol=F32_RTOL,
    )
    out = sampler.fixed_unigram_candidate_sampler(
        torch.tensor([[1]]), 1, 4000, False, len(weights), seed=0, **config
    )
    counts = np.bincount(out.sampled_candidates.numpy(), minlength=len(weights))
    assert chisquare_p(counts, weights) > P_MIN


@pytest.mark.parametrize("seed", [0, 1])
def test_learned_unigram_distribution_and_updates(seed):
    state = sampler.LearnedUnigramSampler(6)
    assert state.counts.tolist() == [1] * 6
    labels = torch.tensor([[0, 2], [2, 2], [5, 2]])
    first = sampler.learned_unigram_candidate_sampler(
        labels, 2, 3, False, 6, seed=seed, state=state
    )
    # expected counts of the first call use the counts before the update (all ones)
    np.testing.assert_allclose(first.true_expected_count.numpy(), np.full((3, 2), 3 / 6), rtol=1e-6)
    counts = np.array([2, 1, 5, 1, 1, 2])
    assert state.counts.tolist() == counts.tolist()
    s = 20_000
    out = sampler.learned_unigram_candidate_sampler(
        torch.tensor([[1, 3]]), 2, s, False, 6, seed=seed, state=state
    )
    ids = out.sampled_candidates.numpy()
    assert chisquare_p(np.bincount(ids, minlength=6), counts) > P_MIN
    np.testing.assert_allclose(
        out.sampled_expected_count.numpy(),
        ref.expected_count(ref.learned_unigram_probability(ids, counts), s, s),
        rtol=F32_RTOL,
    )
    np.testing.assert_allclose(
        out.true_expected_count.numpy(),
        ref.expected_count(ref.learned_unigram_probability([[1, 3]], counts), s, s),
        rtol=F32_RTOL,
    )
    counts[[1, 3]] += 1
    assert state.counts.tolist() == counts.tolist()
    np.testing.assert_allclose(
        state.probability(torch.arange(6)).numpy(), counts / counts.sum(), rtol=1e-6
    )


def test_learned_unigram_state_dict_round_trip():
    a = sampler.LearnedUnigramSampler(8)
    for labels in ([[1], [1], [7]], [[3], [1], [0]]):
        sampler.learned_unigram_candidate_sampler(torch.tensor(labels), 1, 4, True, 8, 0, a)
    sd = a.state_dict()
    assert sd["counts"].tolist() == [2, 4, 1, 2, 1, 1, 1, 2]
    b = sampler.LearnedUnigramSampler(8)
    b.load_state_dict(sd)
    assert b.counts.tolist() == a.counts.tolist()
    ids = torch.arange(8)
    torch.testing.assert_close(a.probability(ids), b.probability(ids), rtol=0, atol=0)
    x = sampler.learned_unigram_candidate_sampler(torch.tensor([[2]]), 1, 5, True, 8, 3, a)
    y = sampler.learned_unigram_candidate_sampler(torch.tensor([[2]]), 1, 5, True, 8, 3, b)
    for u, v in zip(x, y):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    # the saved state is a copy
    sd["counts"][0] = 100
    assert a.counts[0] != 100
    with pytest.raises(ValueError, match="range_max"):
        sampler.LearnedUnigramSampler(9).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"range_max|state"):
        sampler.learned_unigram_candidate_sampler(torch.tensor([[2]]), 1, 5, True, 9, 3, a)


def test_learned_unigram_total_count_is_capped_at_int32_max():
    """TF's ThreadUnsafeUnigramSampler::Update adds at most kint32max - total_weight counts,
    taking the true classes in order."""
    counts = torch.ones(6, dtype=torch.long)
    counts[0] = 2**31 - 1 - 2 - 5  # total 2**31 - 3: room for two more
    state = sampler.LearnedUnigramSampler(6)
    state.load_state_dict({"range_max": 6, "counts": counts})
    p_before = ref.learned_unigram_probability(np.arange(6), counts.numpy())
    out = state.sample(torch.tensor([[1, 2], [3, 4]]), 2, 3, False, 0)
    np.testing.assert_allclose(
        out.true_expected_count.numpy(),
        ref.expected_count(p_before[[[1, 2], [3, 4]]], 3, 3),
        rtol=F32_RTOL,
    )
    want = counts.clone()
    want[[1, 2]] += 1
    assert state.counts.tolist() == want.tolist()
    state.sample(torch.tensor([[5]]), 1, 3, False, 0)
    assert state.counts.tolist() == want.tolist()
    assert int(state.counts.sum()) == 2**31 - 1


def test_fixed_unigram_zero_weight_with_zero_distortion():
    """powf(0, 0) == 1: with distortion 0 every unigram weighs 1, reserved ids stay 0."""
    s = sampler.FixedUnigramSampler(5, distortion=0.0, num_reserved_ids=1, unigrams=[0, 3, 0, 9])
    np.testing.assert_allclose(s.probability(torch.arange(5)).numpy(), [0, 0.25, 0.25, 0.25, 0.25])


def test_learned_unigram_fresh_state_is_uniform():
    out = sampler.learned_unigram_candidate_sampler(LABELS, 2, 10, False, 20, seed=0)
    np.testing.assert_allclose(out.sampled_expected_count.numpy(), np.full(10, 0.5), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# unique=True: distinct ids, law of the ordered draw, num_tries and TF's shortcut
# ----------------------------------------------------------------------------------------------


def _unique_cases():
    yield "uniform", sampler.UniformSampler(5), np.full(5, 0.2)
    k = np.arange(5)
    yield "log_uniform", sampler.LogUniformSampler(5), np.log((k + 2) / (k + 1)) / np.log(6)
    w = np.array([0.0, 1.0, 2.0, 0.0, 5.0, 3.0])
    yield (
        "fixed",
        sampler.FixedUnigramSampler(6, num_reserved_ids=1, unigrams=[1.0, 2.0, 0.0, 5.0, 3.0]),
        w,
    )
    learned = sampler.LearnedUnigramSampler(5)
    learned.load_state_dict({"range_max": 5, "counts": torch.tensor([6, 1, 3, 1, 1])})
    yield "learned", learned, np.array([6.0, 1, 3, 1, 1])


@pytest.mark.parametrize("case", list(_unique_cases()), ids=lambda c: c[0])
def test_unique_ordered_draw_law_and_num_tries(case):
    """The ordered tuple follows TF's rejection loop: successive sampling without replacement;
    the expected counts reveal num_tries, whose mean matches the loop's exact expectation."""
    _, smp, weights = case
    s, n = 3, 2000
    labels = torch.tensor([[int(np.argmax(weights))]])
    law = ref.ordered_unique_probabilities(weights, s)
    gen = torch.Generator().manual_seed(123)
    counts: dict[tuple[int, ...], int] = {}
    tries = []
    p_probs = smp.probability(torch.arange(len(weights))).numpy()  # before any update
    np.testing.assert_allclose(p_probs, weights / weights.sum(), rtol=1e-6)
    for _ in range(n):
        if isinstance(smp, sampler.LearnedUnigramSampler):
            smp.load_state_dict({"range_max": 5, "counts": torch.tensor([6, 1, 3, 1, 1])})
        out = smp.sample(labels, 1, s, True, gen)
        tup = tuple(out.sampled_candidates.tolist())
        assert len(set(tup)) == s
        counts[tup] = counts.get(tup, 0) + 1
        p = p_probs[list(tup)]
        t = infer_num_tries(p, out.sampled_expected_count.numpy(), s)
        assert t is not None, f"expected counts {out.sampled_expected_count} fit no num_tries"
        np.testing.assert_allclose(
            out.true_expected_count.numpy(),
            ref.expected_count(p_probs[labels.numpy()], s, t),
            rtol=F32_RTOL,
        )
        tries.append(t)
    assert set(counts) <= set(law), "drew a tuple of probability 0"
    keys = sorted(law)
    assert chisquare_p([counts.get(k, 0) for k in keys], [law[k] for k in keys]) > P_MIN
    tries = np.asarray(tries, dtype=np.float64)
    want = ref.expected_num_tries(weights, s)
    assert abs(tries.mean() - want) < 5 * tries.std() / math.sqrt(n) + 1e-9, (tries.mean(), want)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unique_many_rejections(seed):
    out = sampler.uniform_candidate_sampler(LABELS, 2, 90, True, 100, seed=seed)
    ids = out.sampled_candidates.numpy()
    assert len(set(ids.tolist())) == 90 and ids.min() >= 0 and ids.max() < 100
    p = ref.uniform_probability(ids, 100)
    t = infer_num_tries(p, out.sampled_expected_count.numpy(), 90)
    assert t is not None and t > 90
    # every id then has the same expected count 1 - (1 - 1/100)**t
    np.testing.assert_allclose(out.sampled_expected_count.numpy(), 1 - 0.99**t, rtol=1e-5)


def test_unique_full_range_is_a_permutation():
    out = sampler.log_uniform_candidate_sampler(LABELS, 2, 10, True, 10, seed=4)
    assert sorted(out.sampled_candidates.tolist()) == list(range(10))


def test_unique_expected_count_shortcut_without_rejection():
    """TF returns p * S when num_tries == S (no repeat drawn), not 1 - (1 - p)**S."""
    r, s = 2**40, 10
    out = sampler.uniform_candidate_sampler(LABELS, 2, s, True, r, seed=0)
    p = np.float32(1.0 / r)
    np.testing.assert_array_equal(
        out.sampled_expected_count.numpy(), np.full(s, p * np.float32(s), dtype=np.float32)
    )
    out = sampler.log_uniform_candidate_sampler(LABELS, 2, s, True, r, seed=0)
    ids = out.sampled_candidates.numpy()
    np.testing.assert_array_equal(
        out.sampled_expected_count.numpy(),
        ref.expected_count(ref.log_uniform_probability(ids, r), s, s),
    )


def test_expected_count_formula_reference():
    """The reference's float32 formula itself (used everywhere above)."""
    p = np.array([0.5, 1e-9, 0.01], dtype=np.float32)
    np.testing.assert_array_equal(ref.expected_count(p, 4, 4), p * np.float32(4))
    got = ref.expected_count(p, 4, 7)
    np.testing.assert_allclose(got, 1 - (1 - p.astype(np.float64)) ** 7, rtol=1e-6)
    assert got.dtype == np.float32


# ----------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------

SAMPLER_FNS = {
    "uniform": lambda tc, s, u, seed: sampler.uniform_candidate_sampler(tc, 2, s, u, 50, seed),
    "log_uniform": lambda tc, s, u, seed: sampler.log_uniform_candidate_sampler(
        tc, 2, s, u, 50, seed
    ),
    "fixed": lambda tc, s, u, seed: sampler.fixed_unigram_candidate_sampler(
        tc, 2, s, u, 50, unigrams=[float(i % 7 + 1) for i in range(50)], seed=seed
    ),
    "learned": lambda tc, s, u, seed: sampler.learned_unigram_candidate_sampler(
        tc, 2, s, u, 50, seed=seed
    ),
}


@pytest.mark.parametrize("name", list(SAMPLER_FNS))
@pytest.mark.parametrize("unique", [True, False])
def test_int_seed_reproduces_and_generator_advances(name, unique):
    fn = SAMPLER_FNS[name]
    a = fn(LABELS, 30, unique, 7)
    b = fn(LABELS, 30, unique, 7)
    c = fn(LABELS, 30, unique, 8)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert not torch.equal(a.sampled_candidates, c.sampled_candidates)
    g = torch.Generator().manual_seed(7)
    d = fn(LABELS, 30, unique, g)
    e = fn(LABELS, 30, unique, g)
    assert not torch.equal(d.sampled_candidates, e.sampled_candidates)
    g2 = torch.Generator().manual_seed(7)
    torch.testing.assert_close(fn(LABELS, 30, unique, g2).sampled_candidates, d.sampled_candidates)
    # None: the global RNG
    torch.manual_seed(11)
    f = fn(LABELS, 30, unique, None)
    torch.manual_seed(11)
    h = fn(LABELS, 30, unique, None)
    torch.testing.assert_close(f.sampled_candidates, h.sampled_candidates)


@pytest.mark.parametrize("cls", [sampler.UniformSampler, sampler.LogUniformSampler])
def test_int_seed_reproduces_on_a_reused_sampler_object(cls):
    """A sampler object used for other draws in between still gives the same draw per seed."""
    assert_reused_sampler_reproduces(cls(60), LABELS, 2)


# ----------------------------------------------------------------------------------------------
# Huge ranges
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unique", [True, False])
def test_uniform_range_beyond_int32(unique):
    r = 2**40
    out = sampler.uniform_candidate_sampler(torch.tensor([[r - 1]]), 1, 2000, unique, r, seed=0)
    ids = out.sampled_candidates
    assert ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < r
    assert int(ids.max()) > 2**32
    assert stats.kstest(ids.double().numpy() / r, "uniform").pvalue > P_MIN
    np.testing.assert_allclose(out.true_expected_count.numpy(), 2000 / r, rtol=1e-6)


@pytest.mark.parametrize("unique", [True, False])
def test_log_uniform_range_beyond_int32(unique):
    r = 2**40
    out = sampler.log_uniform_candidate_sampler(torch.tensor([[r - 1]]), 1, 2000, unique, r, seed=1)
    ids = out.sampled_candidates.numpy()
    assert out.sampled_candidates.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() < r
    assert ids.max() > 2**31
    # randomised probability integral transform: exactly U(0, 1) under P(k)
    v = np.random.default_rng(0).uniform(size=ids.shape)
    lo, hi = np.log1p(ids.astype(np.float64)), np.log(ids.astype(np.float64) + 2)
    u = (lo + v * (hi - lo)) / math.log1p(r)
    if unique:
        # rejecting repeats changes the law of the small ids only: test the ids >= 1e5, whose
        # probability (< 4e-7 each) makes repeats negligible, on their conditional law
        c = 10**5
        u0 = math.log1p(c) / math.log1p(r)
        u = (u[ids >= c] - u0) / (1 - u0)
        assert len(u) > 800
    assert stats.kstest(u, "uniform").pvalue > P_MIN
    big = torch.tensor([2**35, r - 1])
    np.testing.assert_allclose(
        sampler.LogUniformSampler(r).probability(big).numpy(),
        ref.log_uniform_probability(big.numpy(), r),
        rtol=1e-6,
    )


# ----------------------------------------------------------------------------------------------
# all_candidate_sampler
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unique", [True, False])
def test_all_candidate_sampler(unique):
    out = sampler.all_candidate_sampler(LABELS, 2, 9, unique, seed=3)
    assert isinstance(out, sampler.SampledValues)
    assert out.sampled_candidates.tolist() == list(range(9))
    assert out.sampled_candidates.dtype == torch.int64
    assert out.true_expected_count.shape == (3, 2) and (out.true_expected_count == 1).all()
    assert out.sampled_expected_count.shape == (9,) and (out.sampled_expected_count == 1).all()
    assert out.true_expected_count.dtype == torch.float32
    one_d = sampler.all_candidate_sampler(torch.tensor([1, 2, 3]), 1, 4, True)
    assert one_d.true_expected_count.shape == (3, 1)


# ----------------------------------------------------------------------------------------------
# Input formats and argument errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLER_FNS))
def test_true_classes_formats(name):
    fn = SAMPLER_FNS[name]
    a = fn(LABELS, 5, True, 1)
    b = fn(LABELS.int(), 5, True, 1)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert a.true_expected_count.shape == (3, 2)
    assert a.sampled_candidates.shape == (5,) and a.sampled_expected_count.shape == (5,)
    one = sampler.log_uniform_candidate_sampler(torch.tensor([1, 2, 3]), 1, 4, True, 10, seed=0)
    two = sampler.log_uniform_candidate_sampler(torch.tensor([[1], [2], [3]]), 1, 4, True, 10, 0)
    for u, v in zip(one, two):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


SAMPLER_ERRORS = [
    (lambda: sampler.uniform_candidate_sampler(LABELS, 2, 5, True, 0), ValueError, "range_max"),
    (lambda: sampler.uniform_candidate_sampler(LABELS, 2, 0, True, 10), ValueError, "num_sampled"),
    (
        lambda: sampler.uniform_candidate_sampler(LABELS, 2, 11, True, 10),
        ValueError,
        "num_sampled",
    ),
    (
        lambda: sampler.log_uniform_candidate_sampler(LABELS, 2, 11, True, 10),
        ValueError,
        "num_sampled",
    ),
    (lambda: sampler.uniform_candidate_sampler(LABELS, 2, 3, True, 4), ValueError, "true_classes"),
    (
        lambda: sampler.uniform_candidate_sampler(-LABELS - 1, 2, 5, True, 10),
        ValueError,
        "true_classes",
    ),
    (
        lambda: sampler.uniform_candidate_sampler(LABELS.float(), 2, 5, True, 10),
        TypeError,
        "true_classes",
    ),
    (
        lambda: sampler.uniform_candidate_sampler(LABELS.tolist(), 2, 5, True, 10),
        TypeError,
        "true_classes",
    ),
    (lambda: sampler.uniform_candidate_sampler(LABELS, 3, 5, True, 10), ValueError, "true_classes"),
    (
        lambda: sampler.uniform_candidate_sampler(LABELS[:, 0], 2, 5, True, 10),
        ValueError,
        "true_classes",
    ),
    (lambda: sampler.uniform_candidate_sampler(LABELS, 0, 5, True, 10), ValueError, "num_true"),
    (lambda: sampler.uniform_candidate_sampler(LABELS, 2, 5, True, 10, -1), ValueError, "seed"),
    (lambda: sampler.uniform_candidate_sampler(LABELS, 2, 5, True, 10, "x"), TypeError, "seed"),
    (lambda: sampler.uniform_candidate_sampler(LABELS, 2, 5, 1, 10), TypeError, "unique"),
    (
        lambda: sampler.fixed_unigram_candidate_sampler(LABELS, 2, 5, True, 10, unigrams=[1.0] * 9),
        ValueError,
        "range_max",
    ),
    (
        lambda: sampler.fixed_unigram_candidate_sampler(LABELS, 2, 5, True, 10),
        ValueError,
        "vocab_file|unigrams",
    ),
    (
        lambda: sampler.fixed_unigram_candidate_sampler(
            LABELS, 2, 5, True, 10, vocab_file="/nonexistent/v.txt", unigrams=[1.0] * 10
        ),
        ValueError,
        "vocab_file|unigrams",
    ),
    (
        lambda: sampler.fixed_unigram_candidate_sampler(
            LABELS, 2, 5, True, 10, vocab_file="/nonexistent/vocab.txt"
        ),
        ValueError,
        "vocab_file",
    ),
    (
        lambda: sampler.fixed_unigram_candidate_sampler(
            LABELS, 2, 5, True, 5, unigrams=[1.0] * 10, num_shards=2, shard=2
        ),
        ValueError,
        "shard",
    ),
    (
        lambda: sampler.fixed_unigram_candidate_sampler(
            LABELS, 2, 5, True, 10, unigrams=[1.0] * 9 + [-1.0]
        ),
        ValueError,
        "unigram|weight",
    ),
    (
        lambda: sampler.fixed_unigram_candidate_sampler(
            LABELS, 2, 5, True, 10, unigrams=[1.0] * 10, num_reserved_ids=-1
        ),
        ValueError,
        "num_reserved_ids",
    ),
    (
        lambda: sampler.learned_unigram_candidate_sampler(LABELS, 2, 5, True, 2**31),
        ValueError,
        "range_max",
    ),
    (
        lambda: sampler.all_candidate_sampler(LABELS.float(), 2, 5, True),
        TypeError,
        "true_classes",
    ),
    (lambda: sampler.all_candidate_sampler(LABELS, 2, 0, True), ValueError, "num_sampled"),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    SAMPLER_ERRORS,
    ids=[f"{i}-{e.__name__}-{m}" for i, (_, e, m) in enumerate(SAMPLER_ERRORS)],
)
def test_sampler_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_fixed_unigram_rejects_bad_vocab_line(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("a,1\nb,oops\n")
    with pytest.raises(ValueError, match=r"vocab|v\.txt"):
        sampler.fixed_unigram_candidate_sampler(
            torch.tensor([[0]]), 1, 1, False, 2, vocab_file=str(path)
        )


@pytest.mark.timeout(5)
def test_unique_with_too_few_positive_weights_raises():
    """Only 2 ids can ever be drawn: unique=True with num_sampled 3 is num_sampled > range, an
    argument error to report at once (TensorFlow's loop would never end)."""
    with pytest.raises(ValueError, match=r"num_sampled"):
        sampler.fixed_unigram_candidate_sampler(
            torch.tensor([[1]]), 1, 3, True, 4, unigrams=[0.0, 1.0, 0.0, 2.0], seed=0
        )


# ----------------------------------------------------------------------------------------------
# compute_accidental_hits
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("num_true", [1, 2, 5])
def test_compute_accidental_hits_matches_reference(seed, num_true):
    rng = np.random.default_rng(seed)
    sampled = rng.integers(0, 15, 12)
    labels = rng.integers(0, 15, (7, num_true))
    labels[0, :] = sampled[2]
    got = sampler.compute_accidental_hits(
        torch.from_numpy(labels), torch.from_numpy(sampled), num_true
    )
    want = ref.compute_accidental_hits(labels, sampled, num_true)
    assert len(want[0]) > 0
    for g, w, dtype in zip(got, want, (torch.int32, torch.int64, torch.float32)):
        assert g.dtype == dtype
        np.testing.assert_array_equal(g.numpy(), w)
    assert (got[2] == -torch.finfo(torch.float32).max).all()


def test_compute_accidental_hits_last_position_and_formats():
    sampled = torch.tensor([4, 9, 4, 1, 9, 4])
    labels = torch.tensor([[4, 3], [9, 9], [0, 1]])
    idx, ids, _ = sampler.compute_accidental_hits(labels, sampled, 2)
    assert idx.tolist() == [0, 1, 1, 2]
    assert ids.tolist() == [5, 4, 4, 3]
    i1, d1, _ = sampler.compute_accidental_hits(torch.tensor([4, 0, 1]).int(), sampled.int(), 1)
    assert i1.tolist() == [0, 2] and d1.tolist() == [5, 3]
    none = sampler.compute_accidental_hits(torch.tensor([[20]]), sampled, 1)
    assert [t.shape for t in none] == [(0,), (0,), (0,)]
    with pytest.raises(ValueError, match="sampled_candidates"):
        sampler.compute_accidental_hits(labels, sampled[None, :], 2)
    with pytest.raises(TypeError, match="sampled_candidates"):
        sampler.compute_accidental_hits(labels, sampled.float(), 2)
    with pytest.raises(ValueError, match="true_classes"):
        sampler.compute_accidental_hits(labels, sampled, 3)


# ----------------------------------------------------------------------------------------------
# Routing and embedding_lookup
# ----------------------------------------------------------------------------------------------

SHAPES = [(50, 3), (10, 4), (9, 3), (7, 1), (5, 7), (1, 2), (0, 3), (17, 17)]


@pytest.mark.parametrize(("num_rows", "num_shards"), SHAPES)
@pytest.mark.parametrize("strategy", ["mod", "div"])
def test_routing_matches_reference(num_rows, num_shards, strategy):
    assert routing.shard_sizes(num_rows, num_shards) == ref.shard_sizes(num_rows, num_shards)
    ids = torch.arange(num_rows)
    shard, local = routing.route(ids, num_rows, num_shards, strategy)
    want_shard, want_local = ref.locate(num_rows, num_shards, strategy)
    assert shard.dtype == torch.int64 and local.dtype == torch.int64
    np.testing.assert_array_equal(shard.numpy(), want_shard)
    np.testing.assert_array_equal(local.numpy(), want_local)
    for p, g in enumerate(ref.layout(num_rows, num_shards, strategy)):
        back = routing.global_ids(p, torch.arange(len(g)), num_rows, num_shards, strategy)
        np.testing.assert_array_equal(back.numpy(), g)
    rng = np.random.default_rng(num_rows)
    table = torch.from_numpy(rng.normal(size=(num_rows, 3)))
    shards = routing.split_rows(table, num_shards, strategy)
    want = ref.split_rows(table.numpy(), num_shards, strategy)
    assert len(shards) == num_shards
    for s, w in zip(shards, want):
        np.testing.assert_array_equal(s.numpy(), w)
    torch.testing.assert_close(routing.join_rows(shards, strategy), table, rtol=0, atol=0)


@pytest.mark.parametrize(("num_rows", "num_shards"), SHAPES[:6])
@pytest.mark.parametrize("strategy", ["mod", "div"])
def test_partition_inverse(num_rows, num_shards, strategy):
    rng = np.random.default_rng(num_shards)
    ids = rng.integers(0, num_rows, 40)
    ids[:5] = ids[5]  # duplicates
    part = routing.partition(torch.from_numpy(ids), num_rows, num_shards, strategy)
    assert len(part.local_ids) == num_shards
    lay = ref.layout(num_rows, num_shards, strategy)
    shard_of, _ = ref.locate(num_rows, num_shards, strategy)
    looked_up = []
    for p, local in enumerate(part.local_ids):
        g = lay[p][local.numpy()]  # global ids requested from shard p
        assert (shard_of[g] == p).all()
        looked_up.append(g)
    np.testing.assert_array_equal(np.concatenate(looked_up)[part.inverse.numpy()], ids)


def test_routing_errors():
    with pytest.raises(ValueError, match="partition_strategy"):
        routing.route(torch.arange(3), 3, 2, "range")
    with pytest.raises(ValueError, match="partition_strategy"):
        routing.split_rows(torch.zeros(4, 2), 2, "x")
    with pytest.raises(ValueError, match="num_shards"):
        routing.shard_sizes(4, 0)
    with pytest.raises(ValueError, match="shards"):
        routing.join_rows([torch.zeros(2, 1), torch.zeros(4, 1)])


@pytest.mark.parametrize(("num_rows", "num_shards"), SHAPES[:6])
@pytest.mark.parametrize("strategy", ["mod", "div"])
@pytest.mark.parametrize("max_norm", [None, 0.8])
@pytest.mark.parametrize("row_shape", [(4,), (), (2, 3)])
def test_embedding_lookup_matches_reference(num_rows, num_shards, strategy, max_norm, row_shape):
    rng = np.random.default_rng(num_rows + num_shards)
    table = rng.normal(size=(num_rows, *row_shape))
    table[0] = 0.0  # a zero row stays zero under max_norm
    ids = rng.integers(0, num_rows, (3, 4))
    ids[0, :] = ids[1, 1]  # duplicates
    shards = ref.split_rows(table, num_shards, strategy)
    params = [torch.from_numpy(s) for s in shards] if num_shards > 1 else torch.from_numpy(table)
    got = sampler.embedding_lookup(
        params, torch.from_numpy(ids), partition_strategy=strategy, max_norm=max_norm
    )
    want = ref.embedding_lookup(shards, ids, strategy, max_norm)
    assert got.shape == (3, 4, *row_shape)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)
    one_id = sampler.embedding_lookup(params, torch.tensor([num_rows - 1]).int(), strategy)
    np.testing.assert_array_equal(one_id.numpy(), table[[num_rows - 1]])
    empty = sampler.embedding_lookup(params, torch.zeros(0, dtype=torch.long), strategy)
    assert empty.shape == (0, *row_shape)


@pytest.mark.parametrize("strategy", ["mod", "div"])
def test_embedding_lookup_gradient(strategy):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(11, 3))
    shards = [torch.tensor(s, requires_grad=True) for s in ref.split_rows(table, 3, strategy)]
    ids = np.array([[1, 1, 10], [0, 5, 1]])
    up = rng.normal(size=(2, 3, 3))
    out = sampler.embedding_lookup(shards, torch.from_numpy(ids), strategy)
    (out * torch.from_numpy(up)).sum().backward()
    full = np.zeros_like(table)
    np.add.at(full, ids.reshape(-1), up.reshape(-1, 3))
    for s, w in zip(shards, ref.split_rows(full, 3, strategy)):
        np.testing.assert_allclose(s.grad.numpy(), w, rtol=1e-12)


def test_embedding_lookup_more_shards_than_rows_div():
    table = torch.arange(10.0).reshape(5, 2)
    shards = routing.split_rows(table, 7, "div")
    assert [s.shape[0] for s in shards] == [1, 1, 1, 1, 1, 0, 0]
    ids = torch.tensor([4, 0, 3, 3])
    torch.testing.assert_close(sampler.embedding_lookup(shards, ids, "div"), table[ids])


EMB_ERRORS = [
    (lambda p: sampler.embedding_lookup(p, torch.tensor([12])), ValueError, "ids"),
    (lambda p: sampler.embedding_lookup(p, torch.tensor([-1])), ValueError, "ids"),
    (lambda p: sampler.embedding_lookup(p, torch.tensor([1.0])), TypeError, "ids"),
    (lambda p: sampler.embedding_lookup(p, torch.tensor([1]), "range"), ValueError, "partition"),
    (lambda p: sampler.embedding_lookup(p[0], torch.tensor([1]), "range"), ValueError, "partition"),
    (lambda p: sampler.embedding_lookup([p[0], p[0][:1]], torch.tensor([1])), ValueError, "params"),
    (
        lambda p: sampler.embedding_lookup([p[0], p[1][:, :1]], torch.tensor([1])),
        ValueError,
        "params",
    ),
    (lambda p: sampler.embedding_lookup([], torch.tensor([1])), ValueError, "params"),
    (lambda p: sampler.embedding_lookup([p[0].numpy()], torch.tensor([1])), TypeError, "params"),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    EMB_ERRORS,
    ids=[f"{i}-{e.__name__}-{m}" for i, (_, e, m) in enumerate(EMB_ERRORS)],
)
def test_embedding_lookup_errors(call, exc, match):
    params = routing.split_rows(torch.zeros(12, 2), 3, "mod")
    with pytest.raises(exc, match=match):
        call(params)


def test_embedding_lookup_unchecked_skips_range_check_only():
    params = routing.split_rows(torch.zeros(12, 2), 3, "mod")
    with sampler.unchecked(), pytest.raises(TypeError, match="ids"):
        sampler.embedding_lookup(params, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="ids"):
        sampler.embedding_lookup(params, torch.tensor([12]))


@pytest.mark.parametrize("strategy", ["mod", "div"])
def test_embedding_lookup_sparse_grad(strategy):
    rng = np.random.default_rng(1)
    table = rng.normal(size=(11, 3))
    ids = torch.tensor([[1, 1, 10], [0, 5, 1]])
    up = torch.from_numpy(rng.normal(size=(2, 3, 3)))
    grads = {}
    for sparse in (False, True):
        shards = [torch.tensor(s, requires_grad=True) for s in ref.split_rows(table, 3, strategy)]
        (sampler.embedding_lookup(shards, ids, strategy, sparse_grad=sparse) * up).sum().backward()
        assert all((s.grad.layout == torch.sparse_coo) == sparse for s in shards)
        grads[sparse] = [s.grad.to_dense() for s in shards]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b)
    t = torch.tensor(table, requires_grad=True)
    (sampler.gather_rows(t, torch.tensor([3, 3, 0]), sparse_grad=True).sum()).backward()
    assert t.grad.layout == torch.sparse_coo
    want = torch.zeros_like(t)
    want[3] = 2
    want[0] = 1
    torch.testing.assert_close(t.grad.to_dense(), want)


def test_output_dtypes_do_not_follow_torch_default_dtype():
    """TensorFlow's outputs are float32 expected counts and float32 -FLT_MAX hit weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for out in (
            sampler.uniform_candidate_sampler(LABELS, 2, 4, True, 10, seed=0),
            sampler.log_uniform_candidate_sampler(LABELS, 2, 4, True, 10, seed=0),
            sampler.learned_unigram_candidate_sampler(LABELS, 2, 4, True, 10, seed=0),
            sampler.fixed_unigram_candidate_sampler(LABELS, 2, 4, True, 10, unigrams=[1.0] * 10),
            sampler.all_candidate_sampler(LABELS, 2, 4, True),
        ):
            assert out.sampled_candidates.dtype == torch.int64
            assert out.true_expected_count.dtype == torch.float32
            assert out.sampled_expected_count.dtype == torch.float32
        _, _, weights = sampler.compute_accidental_hits(LABELS, torch.tensor([3, 0]), 2)
        assert weights.dtype == torch.float32
        assert (weights == -np.finfo(np.float32).max).all()
    finally:
        torch.set_default_dtype(previous)
