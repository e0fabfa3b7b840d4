"""Candidate samplers with the semantics of TensorFlow's ``tf.random.*_candidate_sampler`` ops.

Each sampler draws ``num_sampled`` candidate ids from ``[0, range_max)`` and reports expected
counts exactly as TensorFlow's ``RangeSampler`` does (see ``range_sampler.cc``):

* ``unique=False``: ``num_sampled`` independent draws; expected count ``num_sampled * p``.
* ``unique=True``: draws are taken in order and repeats are rejected until ``num_sampled``
  distinct ids are found after ``num_tries`` draws; expected count
  ``1 - (1 - p) ** num_tries`` (computed as ``-expm1(num_tries * log1p(-p))`` in float32),
  except that TensorFlow returns ``num_sampled * p`` when no draw was rejected.

Unlike TensorFlow, sampling runs on the device of ``true_classes`` and the rejection loop is
vectorised: the sampler draws a block of candidates, finds the first occurrence of each id
with a sort, and keeps the first ``num_sampled`` distinct ids in draw order, which is the
same distribution as TensorFlow's one-at-a-time loop.

Random streams are PyTorch's, not TensorFlow's: the same seed gives the same samples here, not
the samples TensorFlow would draw. Pass ``sampled_values`` to the losses to reproduce a given
TensorFlow draw exactly.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import numpy as np
import torch

from sampler._checks import as_true_classes, check_ids_in_range, check_positive_int

INT32_MAX = 2**31 - 1
Seed = int | torch.Generator | None


class SampledValues(NamedTuple):
    """What a candidate sampler returns; unpacks like TensorFlow's 3-tuple.

    Attributes:
        sampled_candidates: int64 ``[num_sampled]``.
        true_expected_count: float32 ``[batch_size, num_true]``.
        sampled_expected_count: float32 ``[num_sampled]``.
    """

    sampled_candidates: torch.Tensor
    true_expected_count: torch.Tensor
    sampled_expected_count: torch.Tensor


def make_generator(seed: Seed, device: torch.device) -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` for ``seed``; None (the global RNG) for None.

    An int seed gives a fresh generator, so the same seed always yields the same draw; pass a
    ``torch.Generator`` to advance one stream across calls.
    """
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(
            f"seed must be an int, a torch.Generator or None, got {type(seed).__name__}."
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def expected_count(p: torch.Tensor, num_sampled: int, num_tries: torch.Tensor) -> torch.Tensor:
    """TensorFlow's ``ExpectedCountHelper`` in float32 (see module docstring).

    Args:
        p: float32 probabilities of any shape.
        num_sampled: the number of candidates returned.
        num_tries: int64 scalar tensor, the number of draws it took.
    """
    p = p.float()
    shortcut = p * num_sampled
    full = -torch.expm1(num_tries * torch.log1p(-p))
    return torch.where(num_tries == num_sampled, shortcut, full)


def first_unique(
    stream: torch.Tensor, num_sampled: int, avoid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The first ``num_sampled`` distinct values of ``stream`` in order of first appearance.

    Args:
        stream: int64 ``[M]`` draws in the order they were made.
        num_sampled: how many distinct values are wanted.
        avoid: int64 values that are rejected when drawn (TensorFlow's ``avoided_values``);
            their draws still count as tries.

    Returns:
        ``(values [num_sampled] int64, num_tries int64 scalar tensor, enough)``; when the
        stream has fewer distinct values, ``enough`` is False and the other two are undefined.
    """
    m = stream.numel()
    if m < num_sampled:
        return stream[:0], torch.zeros((), dtype=torch.long, device=stream.device), False
    sorted_vals, order = torch.sort(stream, stable=True)
    is_first = torch.ones(m, dtype=torch.bool, device=stream.device)
    is_first[1:] = sorted_vals[1:] != sorted_vals[:-1]
    if avoid is not None and avoid.numel():
        is_first &= ~torch.isin(sorted_vals, avoid)
    # Positions (in the stream) of first occurrences; the rest pushed past the end.
    key = torch.where(is_first, order, torch.full_like(order, m))
    firsts = torch.sort(key).values[:num_sampled]
    enough = bool(firsts[-1] < m)
    return stream[firsts.clamp(max=m - 1)], firsts[-1] + 1, enough


class RangeSampler:
    """Base class: draws from ``[0, range_max)``; subclasses give ``draw`` and ``probability``."""

    def __init__(self, range_max: int) -> None:
        check_positive_int(range_max, "range_max")
        self.range_max = range_max

    def draw(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """``n`` independent int64 draws."""
        raise NotImplementedError

    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 probability of drawing each id in one draw."""
        raise NotImplementedError

    def update(self, true_classes: torch.Tensor) -> None:
        """Learn from the true classes of a batch (only learned samplers do)."""

    def sample(
        self,
        true_classes: torch.Tensor,
        num_true: int,
        num_sampled: int,
        unique: bool,
        seed: Seed = None,
        avoid_true_classes: bool = False,
    ) -> SampledValues:
        """Sample candidates for a batch; see the module docstring for the semantics.

        Args:
            true_classes: int32/int64 ``[batch_size, num_true]`` (or ``[batch_size]`` for
                num_true 1), ids in ``[0, range_max)``.
            num_true: number of true classes per example.
            num_sampled: number of candidates to draw.
            unique: draw without replacement (rejection of repeats, as TensorFlow does).
            seed: int for a fixed draw, a ``torch.Generator`` to advance, None for the global RNG.
            avoid_true_classes: with ``unique``, never return a true class of the batch
                (TensorFlow's ``avoided_values``: such draws are rejected but count as tries).

        Returns:
            :class:`SampledValues`.
        """
        true_classes = as_true_classes(true_classes, num_true)
        check_positive_int(num_sampled, "num_sampled")
        if not isinstance(unique, bool):
            raise TypeError(f"unique must be a bool, got {type(unique).__name__}.")
        if unique and num_sampled > self.range_max:
            raise ValueError(
                f"num_sampled ({num_sampled}) must be <= range_max ({self.range_max}) when "
                f"unique=True: there are not that many distinct ids; lower num_sampled or set "
                f"unique=False."
            )
        check_ids_in_range(true_classes, self.range_max, "true_classes", "ids must be < range_max.")
        avoid = None
        if avoid_true_classes:
            if not unique:
                raise ValueError("avoid_true_classes needs unique=True (as in TensorFlow).")
            avoid = torch.unique(true_classes)
        if unique:
            available = self.num_drawable() - (0 if avoid is None else avoid.numel())
            if num_sampled > available:
                raise ValueError(
                    f"num_sampled ({num_sampled}) must be <= the number of ids that can be "
                    f"drawn ({available}: ids with non-zero probability"
                    f"{', minus the avoided true classes' if avoid is not None else ''}) when "
                    f"unique=True; lower num_sampled or set unique=False."
                )
        device = true_classes.device
        gen = make_generator(seed, device)
        if unique:
            sampled, num_tries = self._sample_unique(num_sampled, gen, device, avoid)
        else:
            sampled = self.draw(num_sampled, gen, device)
            num_tries = torch.tensor(num_sampled, device=device)
        true_expected = expected_count(self.probability(true_classes), num_sampled, num_tries)
        sampled_expected = expected_count(self.probability(sampled), num_sampled, num_tries)
        self.update(true_classes)
        return SampledValues(sampled, true_expected, sampled_expected)

    def num_drawable(self) -> int:
        """How many ids have a non-zero probability."""
        return self.range_max

    def _sample_unique(
        self,
        num_sampled: int,
        gen: torch.Generator | None,
        device: torch.device,
        avoid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The block sizes depend on the arguments only (no adaptive state), so the random
        # stream consumed by a call is a function of the generator state: a resumed run or a
        # sharded one draws exactly the same candidates. Zipfian draws need ~1.7-2.4 tries
        # per distinct id at typical sizes; the stream doubles when that is not enough.
        stream = self.draw(max(64, math.ceil(2.5 * num_sampled)), gen, device)
        while True:
            values, num_tries, enough = first_unique(stream, num_sampled, avoid)
            if enough:
                return values, num_tries
            if stream.numel() > 64 * num_sampled + 10 * self.range_max + 10_000_000:
                raise RuntimeError(
                    f"drew {stream.numel()} candidates without finding {num_sampled} distinct "
                    f"ids in [0, {self.range_max}): the distribution puts (almost) no mass on "
                    f"enough ids; lower num_sampled or use unique=False."
                )
            stream = torch.cat([stream, self.draw(stream.numel(), gen, device)])


class UniformSampler(RangeSampler):
    """Uniform over ``[0, range_max)``: ``P(k) = 1 / range_max``."""

    def draw(self, n, generator, device):
        return torch.randint(
            0, self.range_max, (n,), generator=generator, device=device, dtype=torch.long
        )

    def probability(self, ids):
        return torch.full(ids.shape, 1.0 / self.range_max, dtype=torch.float32, device=ids.device)


class LogUniformSampler(RangeSampler):
    """Zipfian: ``P(k) = log((k + 2) / (k + 1)) / log(range_max + 1)``.

    Assumes ids are sorted by decreasing frequency. Draws ``floor(exp(u * log(range_max + 1))) - 1``
    for ``u ~ U[0, 1)`` in float64, as TensorFlow's ``LogUniformSampler::Sample``.
    """

    def __init__(self, range_max: int) -> None:
        super().__init__(range_max)
        self.log_range = math.log1p(range_max)

    def draw(self, n, generator, device):
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return (torch.exp(u * self.log_range).long() - 1) % self.range_max

    def probability(self, ids):
        k = ids.double()
        return (torch.log((k + 2.0) / (k + 1.0)) / self.log_range).float()


class _TableSampler(RangeSampler):
    """Inverse-CDF sampling from a weight table held on the device of the first call."""

    def _cdf(self, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, n, generator, device):
        cdf = self._cdf(device)
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64) * cdf[-1]
        return torch.searchsorted(cdf, u, right=True).clamp_(max=self.range_max - 1)


class FixedUnigramSampler(_TableSampler):
    """Samples from fixed unigram weights (TensorFlow's ``FixedUnigramSampler``).

    Weights come from ``unigrams`` or from the last comma-separated field of each line of
    ``vocab_file``; each is raised to ``distortion``; ``num_reserved_ids`` zero-weight ids come
    first. With ``num_shards > 1`` only the ids ``i`` with ``i % num_shards == shard`` are kept,
    and returned candidates index this shard's list (TensorFlow's convention, including its
    counting of reserved ids). ``range_max`` must equal the length of that list.
    """

    def __init__(
        self,
        range_max: int,
        vocab_file: str = "",
        distortion: float = 1.0,
        num_reserved_ids: int = 0,
        num_shards: int = 1,
        shard: int = 0,
        unigrams: list[float] | tuple[float, ...] = (),
    ) -> None:
        super().__init__(range_max)
        check_positive_int(num_shards, "num_shards")
        check_positive_int(num_reserved_ids, "num_reserved_ids", minimum=0)
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, num_shards={num_shards}), got {shard}.")
        if bool(vocab_file) == bool(len(unigrams)):
            raise ValueError(
                "fixed_unigram_candidate_sampler needs exactly one of vocab_file or unigrams, "
                f"got vocab_file={vocab_file!r} and {len(unigrams)} unigrams."
            )
        weights = [0.0 for i in range(num_reserved_ids) if i % num_shards == shard]
        raw = _read_vocab_file(vocab_file) if vocab_file else [float(u) for u in unigrams]
        start = len(weights)  # TensorFlow counts on from the shard's reserved ids
        kept = [w for i, w in enumerate(raw, start) if i % num_shards == shard]
        if any(w < 0 or not math.isfinite(w) for w in kept):
            raise ValueError("unigram weights must be finite and >= 0.")
        dist = np.float32(distortion)
        kept32 = np.power(np.asarray(kept, dtype=np.float32), dist, dtype=np.float32)
        table = np.concatenate([np.asarray(weights, dtype=np.float32), kept32])
        if table.shape[0] != range_max:
            raise ValueError(
                f"range_max ({range_max}) must equal the number of weights for this shard "
                f"({table.shape[0]}: {len(weights)} reserved + {len(kept)} from "
                f"{'vocab_file' if vocab_file else 'unigrams'})."
            )
        if not float(table.sum()) > 0:
            raise ValueError("unigram weights sum to 0: nothing can be sampled.")
        # TensorFlow accumulates its float total one weight at a time.
        self.total_weight = np.float32(np.cumsum(table, dtype=np.float32)[-1])
        self.weights = torch.from_numpy(table)
        self._cdf_cache: dict[torch.device, torch.Tensor] = {}

    def num_drawable(self) -> int:
        return int((self.weights > 0).sum())

    def _cdf(self, device):
        if device not in self._cdf_cache:
            self._cdf_cache[device] = torch.cumsum(self.weights.double(), 0).to(device)
        return self._cdf_cache[device]

    def probability(self, ids):
        w = self.weights.to(ids.device)[ids.clamp(0, self.range_max - 1)]
        p = w / torch.tensor(self.total_weight, device=ids.device)
        return torch.where((ids >= 0) & (ids < self.range_max), p, torch.zeros_like(p))


def _read_vocab_file(path: str) -> list[float]:
    """Weights from the last comma-separated field of each line, as TensorFlow reads them."""
    if not os.path.exists(path):
        raise ValueError(f"vocab_file {path!r} does not exist.")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            field = line.rstrip("\n").split(",")[-1].strip()
            try:
                out.append(float(field))
            except ValueError:
                raise ValueError(
                    f"{path}:{lineno}: expected a number as the last comma-separated field, "
                    f"got {line.rstrip()!r}."
                ) from None
    return out


class LearnedUnigramSampler(_TableSampler):
    """Unigram over counts learned from the true classes seen so far (TensorFlow's ``UnigramSampler``).

    Counts start at 1 for every id; after each call every occurrence of a true class adds 1,
    up to a total of 2**31 - 1 as in TensorFlow. Unlike TensorFlow's, the counts are state you
    can save and restore with :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(self, range_max: int) -> None:
        super().__init__(range_max)
        if range_max >= INT32_MAX:
            raise ValueError(
                f"range_max must be < 2**31 - 1 for the learned unigram sampler (as in "
                f"TensorFlow), got {range_max}."
            )
        self.counts = torch.ones(range_max, dtype=torch.long)
        self._cdf_cached: torch.Tensor | None = None

    def _cdf(self, device):
        if self._cdf_cached is None or self._cdf_cached.device != device:
            self.counts = self.counts.to(device)
            self._cdf_cached = torch.cumsum(self.counts, 0).double()
        return self._cdf_cached

    def probability(self, ids):
        counts = self.counts.to(ids.device)
        total = counts.sum().float()
        return counts[ids].float() / total

    def update(self, true_classes):
        flat = true_classes.reshape(-1)
        counts = self.counts.to(flat.device)
        room = INT32_MAX - int(counts.sum())
        if room <= 0:
            return
        flat = flat[:room]
        self.counts = counts.index_add(0, flat, torch.ones_like(flat))
        self._cdf_cached = None

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {"range_max": self.range_max, "counts": self.counts.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        counts = torch.as_tensor(state["counts"], dtype=torch.long)
        if (
            int(state.get("range_max", counts.numel())) != self.range_max
            or counts.numel() != self.range_max
        ):
            raise ValueError(
                f"state is for range_max {state.get('range_max', counts.numel())}, this sampler "
                f"has range_max {self.range_max}."
            )
        self.counts = counts.clone()
        self._cdf_cached = None


def uniform_candidate_sampler(
    true_classes, num_true, num_sampled, unique, range_max, seed: Seed = None
) -> SampledValues:
    """``tf.random.uniform_candidate_sampler``: ``P(k) = 1 / range_max``.

    Args:
        true_classes: int ``[batch_size, num_true]`` (or ``[batch_size]`` if num_true is 1).
        num_true, num_sampled, unique, range_max: as in TensorFlow.
        seed: int, ``torch.Generator`` or None.

    Returns:
        :class:`SampledValues` on the device of ``true_classes``.
    """
    return UniformSampler(range_max).sample(true_classes, num_true, num_sampled, unique, seed)


def log_uniform_candidate_sampler(
    true_classes, num_true, num_sampled, unique, range_max, seed: Seed = None
) -> SampledValues:
    """``tf.random.log_uniform_candidate_sampler``: ``P(k) = log((k+2)/(k+1)) / log(range_max+1)``.

    Ids must be sorted by decreasing frequency for this to approximate a Zipfian prior.
    Arguments and return as :func:`uniform_candidate_sampler`.
    """
    return LogUniformSampler(range_max).sample(true_classes, num_true, num_sampled, unique, seed)


@functools.lru_cache(maxsize=16)
def _fixed_sampler(
    range_max, vocab_file, distortion, num_reserved_ids, num_shards, shard, unigrams
):
    return FixedUnigramSampler(
        range_max, vocab_file, distortion, num_reserved_ids, num_shards, shard, unigrams
    )


def fixed_unigram_candidate_sampler(
    true_classes,
    num_true,
    num_sampled,
    unique,
    range_max,
    vocab_file: str = "",
    distortion: float = 1.0,
    num_reserved_ids: int = 0,
    num_shards: int = 1,
    shard: int = 0,
    unigrams=(),
    seed: Seed = None,
) -> SampledValues:
    """``tf.random.fixed_unigram_candidate_sampler``; see :class:`FixedUnigramSampler`.

    The weight table is built once per distinct set of arguments and cached.
    """
    sampler = _fixed_sampler(
        range_max,
        vocab_file,
        float(distortion),
        num_reserved_ids,
        num_shards,
        shard,
        tuple(float(u) for u in unigrams),
    )
    return sampler.sample(true_classes, num_true, num_sampled, unique, seed)


def learned_unigram_candidate_sampler(
    true_classes,
    num_true,
    num_sampled,
    unique,
    range_max,
    seed: Seed = None,
    state: LearnedUnigramSampler | None = None,
) -> SampledValues:
    """``tf.random.learned_unigram_candidate_sampler``.

    Pass the same ``state`` (a :class:`LearnedUnigramSampler`) on every call to keep learning
    counts, as TensorFlow's op does across steps; with ``state=None`` a fresh one (all counts 1)
    is used, which is a uniform draw.
    """
    if state is None:
        state = LearnedUnigramSampler(range_max)
    elif state.range_max != range_max:
        raise ValueError(f"state has range_max {state.range_max}, the call asks for {range_max}.")
    return state.sample(true_classes, num_true, num_sampled, unique, seed)


def all_candidate_sampler(
    true_classes, num_true, num_sampled, unique, seed: Seed = None
) -> SampledValues:
    """``tf.random.all_candidate_sampler``: every id in ``[0, num_sampled)``, expected counts 1.

    ``unique`` and ``seed`` are accepted for signature compatibility and ignored, as in TensorFlow.
    """
    true_classes = as_true_classes(true_classes, num_true)
    check_positive_int(num_sampled, "num_sampled")
    device = true_classes.device
    sampled = torch.arange(num_sampled, device=device)
    return SampledValues(
        sampled,
        torch.ones(true_classes.shape, dtype=torch.float32, device=device),
        torch.ones(num_sampled, dtype=torch.float32, device=device),
    )


def compute_accidental_hits(
    true_classes: torch.Tensor, sampled_candidates: torch.Tensor, num_true: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tf.nn.compute_accidental_hits``: where a sampled candidate equals a true class.

    For each row ``i`` and each true class of it that occurs in ``sampled_candidates``, one
    entry ``(i, j, -FLT_MAX)`` where ``j`` is the position of that id in ``sampled_candidates``
    (the last position when it occurs several times, as in TensorFlow). Entries come in row
    order, then true-class order.

    Args:
        true_classes: int ``[batch_size, num_true]`` (or ``[batch_size]`` if num_true is 1).
        sampled_candidates: int ``[num_sampled]``.
        num_true: number of true classes per row.

    Returns:
        ``(indices int32 [H], ids int64 [H], weights float32 [H])``.
    """
    true_classes = as_true_classes(true_classes, num_true)
    sampled = _check_sampled(sampled_candidates)
    row, pos = accidental_hit_positions(true_classes, sampled)
    weights = torch.full(
        row.shape, torch.finfo(torch.float32).min, dtype=torch.float32, device=row.device
    )
    return row.int(), pos, weights


def _hit_lookup(
    true_classes: torch.Tensor, sampled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each true class (row-major ``[B*T]``): whether it occurs in ``sampled`` and the
    position of its last occurrence (meaningful only where it occurs)."""
    sorted_vals, order = torch.sort(sampled, stable=True)
    flat = true_classes.reshape(-1)
    idx = torch.searchsorted(sorted_vals, flat, right=True) - 1
    safe = idx.clamp(min=0)
    hit = (idx >= 0) & (sorted_vals[safe] == flat)
    return hit, order[safe]


def accidental_hit_positions(
    true_classes: torch.Tensor, sampled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and sampled positions of accidental hits (int64 ``[H]`` each); see above."""
    hit, pos = _hit_lookup(true_classes, sampled)
    where = torch.nonzero(hit).squeeze(1)
    return where // true_classes.shape[1], pos[where]


def accidental_hit_mask(true_classes: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """bool ``[B, S]``: True where a row's true class sits at that sampled position (the last
    position of a repeated id, as :func:`compute_accidental_hits`), computed without a host sync.
    """
    batch, num_true = true_classes.shape
    hit, pos = _hit_lookup(true_classes, sampled)
    rows = torch.arange(batch, device=hit.device).repeat_interleave(num_true)
    counts = torch.zeros(batch, sampled.numel(), dtype=torch.int32, device=hit.device)
    counts.index_put_((rows, pos), hit.int(), accumulate=True)
    return counts > 0


def _check_sampled(sampled_candidates) -> torch.Tensor:
    if not isinstance(sampled_candidates, torch.Tensor) or sampled_candidates.dtype not in (
        torch.int32,
        torch.int64,
    ):
        raise TypeError(
            "sampled_candidates must be an int32/int64 torch.Tensor, got "
            f"{getattr(sampled_candidates, 'dtype', type(sampled_candidates).__name__)}."
        )
    if sampled_candidates.dim() != 1:
        raise ValueError(
            f"sampled_candidates must have shape [num_sampled], got {list(sampled_candidates.shape)}."
        )
    return sampled_candidates.long()
