"""Seeded test cases shared by the sampler tests (NumPy only; converted by each test)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tests.sampler import reference as ref


@dataclass
class Case:
    weights: np.ndarray  # [C, D] float32, the full table
    biases: np.ndarray  # [C] float32
    labels: np.ndarray  # [B, T] int64
    inputs: np.ndarray  # [B, D] float32
    sampled: np.ndarray  # [S] int64
    true_ec: np.ndarray  # [B, T] float32
    sampled_ec: np.ndarray  # [S] float32
    upstream: np.ndarray  # [B] float32, weights of the per-example losses
    num_true: int
    num_sampled: int
    num_classes: int

    @property
    def sampled_values(self):
        return (self.sampled, self.true_ec, self.sampled_ec)

    def weight_shards(self, num_shards: int, strategy: str):
        """The weights as a single array (num_shards 0) or a list of shards."""
        if num_shards == 0:
            return self.weights
        return ref.split_rows(self.weights, num_shards, strategy)

    def problem(self, num_shards: int = 0, strategy: str = "mod", bias_shards=False):
        """The reference's arguments for this case: :class:`reference.Problem`."""
        w = self.weight_shards(num_shards, strategy)
        b = ref.split_rows(self.biases, num_shards, strategy) if bias_shards else self.biases
        return ref.Problem(w, b, self.labels, self.inputs, self.sampled_values, self.num_true)

    def num_hits(self) -> int:
        return len(ref.compute_accidental_hits(self.labels, self.sampled, self.num_true)[0])


def make_case(
    seed: int,
    num_true: int = 1,
    *,
    unique: bool = True,
    batch: int = 8,
    dim: int = 6,
    num_classes: int = 50,
    num_sampled: int = 20,
    scale: float = 0.5,
) -> Case:
    """A case with log-uniform sampled values (TF's default sampler) and forced accidental hits.

    unique=True: distinct sampled ids and expected counts from the rejection formula with
    ``num_tries > num_sampled``; unique=False: repeated sampled ids (so that only the last
    position of a repeat is an accidental hit) and ``p * S`` expected counts.
    Labels include hits in several rows, a row whose true classes repeat, and a row whose
    repeated true class is also sampled.
    """
    rng = np.random.default_rng(seed)
    c, s, t = num_classes, num_sampled, num_true
    weights = rng.normal(0.0, scale, (c, dim)).astype(np.float32)
    biases = rng.normal(0.0, 0.3, c).astype(np.float32)
    inputs = rng.normal(0.0, 1.0, (batch, dim)).astype(np.float32)
    p = ref.log_uniform_probability(np.arange(c), c).astype(np.float64)
    p /= p.sum()
    if unique:
        sampled = rng.choice(c, s, replace=False, p=p).astype(np.int64)
        num_tries = s + int(rng.integers(1, 3 * s))
    else:
        sampled = rng.choice(c, s, replace=True, p=p).astype(np.int64)
        sampled[-3:] = sampled[:3]  # repeats, the last occurrence counts for accidental hits
        num_tries = s
    labels = rng.integers(0, c, (batch, t)).astype(np.int64)
    for b in range(0, batch, 2):
        labels[b, rng.integers(t)] = sampled[rng.integers(s)]
    labels[1 % batch, :] = labels[1 % batch, 0]  # repeated true class in a row
    labels[3 % batch, :] = sampled[0]  # repeated true class that is also sampled
    if t > 1:
        labels[5 % batch, 1] = sampled[-1]
    true_ec = ref.expected_count(ref.log_uniform_probability(labels, c), s, num_tries).reshape(
        batch, t
    )
    sampled_ec = ref.expected_count(ref.log_uniform_probability(sampled, c), s, num_tries)
    upstream = rng.uniform(0.5, 1.5, batch).astype(np.float32)
    return Case(weights, biases, labels, inputs, sampled, true_ec, sampled_ec, upstream, t, s, c)


def reference_loss(
    kind: str,
    case: Case,
    num_shards=0,
    strategy="mod",
    remove=None,
    bias_shards=False,
    weighted=True,
) -> dict:
    """The float64 NumPy reference's loss and gradients for ``case``; weights, biases as lists.

    The gradients are those of ``sum(case.upstream * loss)``, or of ``loss.sum()`` where
    ``weighted`` is False.
    """
    r = ref.sampled_loss(
        kind,
        case.problem(num_shards, strategy, bias_shards),
        remove_accidental_hits=remove,
        partition_strategy=strategy,
        upstream=case.upstream if weighted else None,
    )
    r["weights"] = r["weights"] if isinstance(r["weights"], list) else [r["weights"]]
    r["biases"] = r["biases"] if isinstance(r["biases"], list) else [r["biases"]]
    return r


def loss_kwargs(case: Case, to_tensor, weights, biases=None, inputs=None, **overrides) -> dict:
    """The keyword arguments of a TF-signature call on ``case``: ``sampled_softmax_loss``,
    ``nce_loss`` or ``compute_sampled_logits``, ours or TensorFlow's.

    ``to_tensor`` converts the case's arrays (``torch.from_numpy``, ``tf.constant``); the
    weights (a table or its shards), and biases and inputs where given, are passed as they are
    (trainable leaves); ``overrides`` add or replace keywords.
    """
    kw = dict(
        weights=weights,
        biases=to_tensor(case.biases) if biases is None else biases,
        labels=to_tensor(case.labels),
        inputs=to_tensor(case.inputs) if inputs is None else inputs,
        num_sampled=case.num_sampled,
        num_classes=case.num_classes,
        num_true=case.num_true,
        sampled_values=tuple(to_tensor(v) for v in case.sampled_values),
    )
    kw.update(overrides)
    return kw
