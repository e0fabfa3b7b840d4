"""sampled_softmax_loss / nce_loss / compute_sampled_logits against the float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sampler
from tests.sampler import reference as ref
from tests.sampler.cases import loss_kwargs, make_case
from tests.sampler.cases import reference_loss as run_ref

LAYOUTS = [(0, "mod"), (1, "mod"), (3, "mod"), (3, "div"), (4, "div")]
LOSSES = {"softmax": sampler.sampled_softmax_loss, "nce": sampler.nce_loss}


def _t(a, dtype=None, grad=False):
    t = torch.from_numpy(np.asarray(a))
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(grad)


def _weights(case, num_shards, strategy, dtype=torch.float32, grad=True):
    w = case.weight_shards(num_shards, strategy)
    if isinstance(w, list):
        return [_t(s, dtype, grad) for s in w]
    return _t(w, dtype, grad)


def _leaves(w):
    return w if isinstance(w, list) else [w]


def _case_tensors(case):
    """``(weights [C, D], biases [C], labels [B, T], inputs [B, D])``: a loss's first arguments."""
    return tuple(torch.from_numpy(a) for a in (case.weights, case.biases, case.labels, case.inputs))


def _sv(case, device="cpu"):
    return sampler.SampledValues(*(torch.from_numpy(v).to(device) for v in case.sampled_values))


def run_ours(
    kind,
    case,
    num_shards=0,
    strategy="mod",
    remove=None,
    dtype=torch.float32,
    bias_shards=False,
    sparse_grad=False,
    labels=None,
):
    """Our loss and the gradients of sum(upstream * loss), as float64 NumPy arrays."""
    w = _weights(case, num_shards, strategy, dtype)
    b_np = ref.split_rows(case.biases, num_shards, strategy) if bias_shards else case.biases
    b = [_t(s, dtype, True) for s in b_np] if bias_shards else _t(b_np, dtype, True)
    x = _t(case.inputs, dtype, True)
    kw = {} if remove is None else {"remove_accidental_hits": remove}
    loss = LOSSES[kind](
        w,
        b,
        torch.from_numpy(case.labels) if labels is None else labels,
        x,
        case.num_sampled,
        case.num_classes,
        num_true=case.num_true,
        sampled_values=_sv(case),
        partition_strategy=strategy,
        sparse_grad=sparse_grad,
        **kw,
    )
    (loss * _t(case.upstream, loss.dtype)).sum().backward()
    return {
        "loss": loss.detach().double().numpy(),
        "inputs": x.grad.double().numpy(),
        "weights": [t.grad.to_dense().double().numpy() for t in _leaves(w)],
        "biases": [t.grad.to_dense().double().numpy() for t in _leaves(b)],
        "raw": (w, b, x, loss),
    }


def assert_matches(got, want, rtol, atol):
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(got["inputs"], want["inputs"], rtol=rtol, atol=atol)
    for key in ("weights", "biases"):
        assert len(got[key]) == len(want[key])
        for g, w in zip(got[key], want[key]):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize("num_true", [1, 2, 3, 4])
@pytest.mark.parametrize(("num_shards", "strategy"), LAYOUTS)
@pytest.mark.parametrize("remove", [True, False])
@pytest.mark.parametrize("unique", [True, False])
def test_float32_matches_reference(kind, num_true, num_shards, strategy, remove, unique):
    case = make_case(1000 + 10 * num_true + num_shards + 5 * unique, num_true, unique=unique)
    assert case.num_hits() >= 3
    got = run_ours(kind, case, num_shards, strategy, remove)
    assert got["raw"][3].dtype == torch.float32
    assert_matches(got, run_ref(kind, case, num_shards, strategy, remove), 1e-5, 1e-6)


@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("num_shards", "strategy"), [(0, "mod"), (3, "mod"), (3, "div")])
@pytest.mark.parametrize("remove", [True, False])
def test_float64_matches_reference_tightly(kind, seed, num_shards, strategy, remove):
    case = make_case(2000 + seed, 1 + seed, unique=bool(seed % 2), scale=1.5)
    got = run_ours(kind, case, num_shards, strategy, remove, dtype=torch.float64)
    assert got["raw"][3].dtype == torch.float64
    assert_matches(got, run_ref(kind, case, num_shards, strategy, remove), 1e-10, 1e-12)


@pytest.mark.parametrize("kind", ["softmax", "nce"])
def test_default_remove_accidental_hits(kind):
    """TF defaults: sampled_softmax_loss removes accidental hits, nce_loss does not."""
    case = make_case(3, 2)
    got = run_ours(kind, case, remove=None)
    assert_matches(got, run_ref(kind, case, remove=kind == "softmax"), 1e-5, 1e-6)
    other = run_ref(kind, case, remove=kind != "softmax")
    assert not np.allclose(got["loss"], other["loss"], rtol=1e-4)


@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize("strategy", ["mod", "div"])
def test_sharded_biases(kind, strategy):
    """biases may be a list of shards in the same layout as the weights."""
    case = make_case(4, 2)
    got = run_ours(kind, case, 3, strategy, True, bias_shards=True)
    assert_matches(got, run_ref(kind, case, 3, strategy, True, bias_shards=True), 1e-5, 1e-6)


def test_accidental_hit_of_a_repeated_sampled_id_masks_only_its_last_position():
    case = make_case(8, 1, unique=False)
    lab = int(case.sampled[0])  # sampled[0] == sampled[-3]: only position S-3 is a hit
    case.labels[:] = lab
    logits, _ = sampler.compute_sampled_logits(
        *_case_tensors(case),
        case.num_sampled,
        case.num_classes,
        sampled_values=_sv(case),
        remove_accidental_hits=True,
    )
    positions = np.flatnonzero(case.sampled == lab)
    assert len(positions) >= 2
    masked = logits[:, 1:].numpy() <= -1e30
    assert masked[:, positions[-1]].all()
    assert not masked[:, positions[:-1]].any()
    assert masked.sum() == case.labels.shape[0]


@pytest.mark.parametrize("num_true", [1, 3])
@pytest.mark.parametrize("remove", [True, False])
@pytest.mark.parametrize("subtract_log_q", [True, False])
@pytest.mark.parametrize(("num_shards", "strategy"), [(0, "mod"), (3, "div")])
def test_compute_sampled_logits_matches_reference(
    num_true, remove, subtract_log_q, num_shards, strategy
):
    case = make_case(30 + num_true, num_true, unique=False)
    logits, labels = sampler.compute_sampled_logits(
        **loss_kwargs(
            case,
            torch.from_numpy,
            _weights(case, num_shards, strategy, grad=False),
            sampled_values=_sv(case),
            subtract_log_q=subtract_log_q,
            remove_accidental_hits=remove,
            partition_strategy=strategy,
        )
    )
    want = ref.compute_sampled_logits(
        case.problem(num_shards, strategy), subtract_log_q, remove, strategy
    )
    assert logits.shape == (8, num_true + case.num_sampled)
    assert logits.dtype == torch.float32
    assert labels.dtype == torch.float32
    np.testing.assert_allclose(labels.numpy(), want.labels, rtol=1e-7, atol=0)
    got = logits.double().numpy()
    np.testing.assert_array_equal(got <= -1e30, want.mask)
    assert want.mask.any() == remove
    np.testing.assert_allclose(got[~want.mask], want.logits[~want.mask], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Label formats
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["softmax", "nce"])
def test_labels_1d_equals_2d(kind):
    case = make_case(40, 1)
    a = run_ours(kind, case, labels=torch.from_numpy(case.labels[:, 0].copy()))
    b = run_ours(kind, case)
    assert a["raw"][3].shape == (8,)
    assert_matches(a, b, 0, 0)


@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize("num_true", [1, 3])
def test_int32_labels(kind, num_true):
    case = make_case(41, num_true)
    a = run_ours(kind, case, labels=torch.from_numpy(case.labels).int())
    assert_matches(a, run_ref(kind, case), 1e-5, 1e-6)


def test_int32_sampled_candidates():
    case = make_case(42, 2)
    sv = (
        torch.from_numpy(case.sampled).int(),
        *(torch.from_numpy(v) for v in case.sampled_values[1:]),
    )
    loss = sampler.sampled_softmax_loss(
        *_case_tensors(case),
        case.num_sampled,
        case.num_classes,
        num_true=2,
        sampled_values=sv,
    )
    np.testing.assert_allclose(loss.numpy(), run_ref("softmax", case)["loss"], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Half precision
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
@pytest.mark.parametrize("half_weights", [False, True])
@pytest.mark.parametrize("remove", [True, False])
def test_half_precision_finite_and_close(kind, dtype, tol, half_weights, remove):
    case = make_case(50, 2)
    assert case.num_hits() >= 3
    w = _t(case.weights, dtype if half_weights else torch.float32, True)
    b = _t(case.biases, dtype if half_weights else torch.float32, True)
    x = _t(case.inputs, dtype, True)
    loss = LOSSES[kind](
        w,
        b,
        torch.from_numpy(case.labels),
        x,
        case.num_sampled,
        case.num_classes,
        num_true=2,
        sampled_values=_sv(case),
        remove_accidental_hits=remove,
    )
    assert torch.isfinite(loss).all()
    loss.float().sum().backward()
    for g in (w.grad, b.grad, x.grad):
        assert torch.isfinite(g.float()).all()
    want = run_ref(kind, case, remove=remove)
    np.testing.assert_allclose(loss.double().detach().numpy(), want["loss"], rtol=tol, atol=tol)
    np.testing.assert_allclose(
        x.grad.double().numpy(),
        run_ref(kind, case, remove=remove, weighted=False)["inputs"],
        rtol=tol,
        atol=3 * tol,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_mask_finite(dtype):
    case = make_case(51, 1)
    logits, _ = sampler.compute_sampled_logits(
        torch.from_numpy(case.weights).to(dtype),
        torch.from_numpy(case.biases).to(dtype),
        torch.from_numpy(case.labels),
        torch.from_numpy(case.inputs).to(dtype),
        case.num_sampled,
        case.num_classes,
        sampled_values=_sv(case),
        remove_accidental_hits=True,
    )
    assert torch.isfinite(logits).all()
    mask = ref.accidental_hit_mask(case.labels, case.sampled, 1)
    assert mask.any()
    # masked entries are the lowest values of their row by far
    sampled_part = logits[:, 1:].float().numpy()
    assert (sampled_part[mask] <= -6e4).all()
    assert (sampled_part[mask] < sampled_part[~mask].min() - 100).all()


# ----------------------------------------------------------------------------------------------
# Sparse gradients and optimizers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize(("num_shards", "strategy"), [(0, "mod"), (3, "mod"), (3, "div")])
def test_sparse_grad_equals_dense(kind, num_shards, strategy):
    case = make_case(60 + num_shards, 2)
    sparse = run_ours(kind, case, num_shards, strategy, sparse_grad=True)
    w, b, _, _ = sparse["raw"]
    for t in [*_leaves(w), b]:
        assert t.grad.layout == torch.sparse_coo
        assert t.grad.shape == t.shape
    dense = run_ours(kind, case, num_shards, strategy, sparse_grad=False)
    for t in [*_leaves(dense["raw"][0]), dense["raw"][1]]:
        assert t.grad.layout == torch.strided
    assert_matches(sparse, dense, 1e-6, 1e-7)
    assert_matches(sparse, run_ref(kind, case, num_shards, strategy), 1e-5, 1e-6)


def _train(opt_cls, sparse, steps=3, num_shards=0, strategy="mod", **opt_kw):
    """A few steps on an nn.Embedding-like table; returns (weights, biases) as tensors."""
    case = make_case(70, 2)
    torch.manual_seed(0)
    emb = torch.nn.Embedding(case.num_classes, 6, sparse=sparse)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(case.weights))
    if num_shards:
        weights = [
            torch.nn.Parameter(s.clone())
            for s in sampler.routing.split_rows(emb.weight.detach(), num_shards, strategy)
        ]
    else:
        weights = emb.weight
    bias = torch.nn.Parameter(torch.from_numpy(case.biases).clone())
    x = torch.from_numpy(case.inputs)
    labels = torch.from_numpy(case.labels)
    opt = opt_cls([*_leaves(weights), bias], **opt_kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        sv = sampler.log_uniform_candidate_sampler(labels, 2, 10, True, case.num_classes, seed=gen)
        loss = sampler.sampled_softmax_loss(
            weights,
            bias,
            labels,
            x,
            10,
            case.num_classes,
            num_true=2,
            sampled_values=sv,
            partition_strategy=strategy,
            sparse_grad=sparse,
        )
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    if num_shards:
        weights = sampler.routing.join_rows([w.detach() for w in weights], strategy)
    return weights.detach().clone(), bias.detach().clone(), case


@pytest.mark.parametrize(("num_shards", "strategy"), [(0, "mod"), (3, "div")])
def test_sgd_with_sparse_grads_equals_dense(num_shards, strategy):
    ws, bs, _ = _train(torch.optim.SGD, True, num_shards=num_shards, strategy=strategy, lr=0.5)
    wd, bd, case = _train(torch.optim.SGD, False, num_shards=num_shards, strategy=strategy, lr=0.5)
    torch.testing.assert_close(ws, wd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bs, bd, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ws, torch.from_numpy(case.weights))


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("opt_cls", [torch.optim.SparseAdam, torch.optim.Adagrad])
def test_sparse_optimizers_update_only_touched_rows(opt_cls):
    w, b, case = _train(opt_cls, True, steps=1, lr=0.1)
    labels = torch.from_numpy(case.labels)
    gen = torch.Generator().manual_seed(1)
    sv = sampler.log_uniform_candidate_sampler(labels, 2, 10, True, case.num_classes, seed=gen)
    touched = torch.zeros(case.num_classes, dtype=torch.bool)
    touched[labels.reshape(-1)] = True
    touched[sv.sampled_candidates] = True
    w0 = torch.from_numpy(case.weights)
    changed = (w != w0).any(1)
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    assert not changed[~touched].any()
    assert changed[touched].sum() >= touched.sum() - 2


# ----------------------------------------------------------------------------------------------
# Default sampling path
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize("seed", [0, 5])
def test_default_sampler_is_seeded_unique_log_uniform(kind, seed):
    case = make_case(80, 2)
    args = (*_case_tensors(case), case.num_sampled, case.num_classes)
    a = LOSSES[kind](*args, num_true=2, seed=seed)
    b = LOSSES[kind](*args, num_true=2, seed=seed)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    sv = sampler.log_uniform_candidate_sampler(
        torch.from_numpy(case.labels), 2, case.num_sampled, True, case.num_classes, seed=seed
    )
    assert len(set(sv.sampled_candidates.tolist())) == case.num_sampled
    c = LOSSES[kind](*args, num_true=2, sampled_values=sv)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# SampledSoftmaxLoss module (MindSpore's interface)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_true": 0}, ValueError, "num_true"),
        ({"seed": -1}, ValueError, "seed"),
        ({"num_sampled": 51}, ValueError, "num_sampled"),
        ({"num_true": 51}, ValueError, "num_true"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"sampled_values": (1, 2)}, ValueError, "sampled_values"),
        ({"sampled_values": torch.zeros(3)}, TypeError, "sampled_values"),
    ],
)
def test_module_argument_errors(kwargs, exc, match):
    args = {"num_sampled": 10, "num_classes": 50, **kwargs}
    with pytest.raises(exc, match=match):
        sampler.SampledSoftmaxLoss(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_rejects_float_labels(dtype):
    case = make_case(90, 1)
    m = sampler.SampledSoftmaxLoss(10, 50, seed=1)
    with pytest.raises(TypeError, match="labels"):
        m(
            torch.from_numpy(case.weights),
            torch.from_numpy(case.biases),
            torch.from_numpy(case.labels).to(dtype),
            torch.from_numpy(case.inputs),
        )


@pytest.mark.parametrize("num_true", [1, 2])
def test_module_reductions_with_fixed_sampled_values(num_true):
    case = make_case(91, num_true)
    args = _case_tensors(case)
    want = run_ref("softmax", case)["loss"]
    out = {}
    for reduction in ("none", "mean", "sum"):
        m = sampler.SampledSoftmaxLoss(
            case.num_sampled, 50, num_true, sampled_values=_sv(case), reduction=reduction
        )
        out[reduction] = m(*args)
    assert out["none"].shape == (8,)
    assert out["mean"].shape == () and out["sum"].shape == ()
    np.testing.assert_allclose(out["none"].numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(out["mean"].item(), want.mean(), rtol=1e-5)
    np.testing.assert_allclose(out["sum"].item(), want.sum(), rtol=1e-5)
    # sampled_values as a list works too
    m = sampler.SampledSoftmaxLoss(case.num_sampled, 50, num_true, sampled_values=list(_sv(case)))
    np.testing.assert_allclose(m(*args).numpy(), want, rtol=1e-5)


def test_module_remove_accidental_hits_flag():
    case = make_case(92, 1)
    args = _case_tensors(case)
    m = sampler.SampledSoftmaxLoss(20, 50, sampled_values=_sv(case), remove_accidental_hits=False)
    np.testing.assert_allclose(
        m(*args).numpy(), run_ref("softmax", case, remove=False)["loss"], rtol=1e-5
    )


def test_module_seed_reproducible():
    case = make_case(93, 2)
    args = _case_tensors(case)
    a = sampler.SampledSoftmaxLoss(10, 50, 2, seed=3)
    b = sampler.SampledSoftmaxLoss(10, 50, 2, seed=3)
    c = sampler.SampledSoftmaxLoss(10, 50, 2, seed=4)
    la = [a(*args) for _ in range(3)]
    lb = [b(*args) for _ in range(3)]
    lc = [c(*args) for _ in range(3)]
    for x, y in zip(la, lb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert any(not torch.equal(x, y) for x, y in zip(la, lc))
    for x in la:
        assert x.shape == (8,) and torch.isfinite(x).all()


def test_module_backward():
    case = make_case(94, 1)
    w = _t(case.weights, grad=True)
    m = sampler.SampledSoftmaxLoss(20, 50, sampled_values=_sv(case), reduction="sum")
    m(w, torch.from_numpy(case.biases), torch.from_numpy(case.labels), _t(case.inputs)).backward()
    np.testing.assert_allclose(
        w.grad.numpy(),
        ref.sampled_softmax_loss(
            case.weights, case.biases, case.labels, case.inputs, case.sampled_values
        )["weights"],
        rtol=1e-5,
        atol=1e-6,
    )


# ----------------------------------------------------------------------------------------------
# Argument errors of the functions
# ----------------------------------------------------------------------------------------------


def _call(kind="softmax", **over):
    case = make_case(99, 2)
    kw = {
        "weights": torch.from_numpy(case.weights),
        "biases": torch.from_numpy(case.biases),
        "labels": torch.from_numpy(case.labels),
        "inputs": torch.from_numpy(case.inputs),
        "num_sampled": case.num_sampled,
        "num_classes": case.num_classes,
        "num_true": 2,
        "sampled_values": _sv(case),
    }
    kw.update({k: (v(kw, case) if callable(v) else v) for k, v in over.items()})
    return LOSSES[kind](**kw)


def _labels_with(value):
    def f(kw, case):
        lab = torch.from_numpy(case.labels).clone()
        lab[2, 1] = value
        return lab

    return f


def _sv_with(i, fn):
    """sampled_values with element ``i`` replaced by ``fn(element)``."""

    def f(kw, case):
        sv = list(kw["sampled_values"])
        sv[i] = fn(sv[i])
        return tuple(sv)

    return f


def _p(over, exc, match, id):
    return pytest.param(over, exc, match, id=id)


ERRORS = [
    _p({"labels": _labels_with(50)}, ValueError, "labels", "labels-too-large"),
    _p({"labels": _labels_with(-1)}, ValueError, "labels", "labels-negative"),
    _p(
        {"labels": _labels_with(50), "sampled_values": None},
        ValueError,
        "labels",
        "labels-too-large-default-sampler",
    ),
    _p({"labels": lambda kw, c: kw["labels"].float()}, TypeError, "labels", "labels-float"),
    _p({"labels": lambda kw, c: kw["labels"][:, :1]}, ValueError, "labels", "labels-num-true"),
    _p({"labels": lambda kw, c: kw["labels"][:5]}, ValueError, "labels", "labels-batch"),
    _p({"labels": lambda kw, c: kw["labels"].numpy()}, TypeError, "labels", "labels-numpy"),
    _p({"inputs": lambda kw, c: kw["inputs"][0]}, ValueError, "inputs", "inputs-1d"),
    _p({"inputs": lambda kw, c: kw["inputs"].long()}, TypeError, "inputs", "inputs-int"),
    _p({"inputs": lambda kw, c: kw["inputs"][:, :5]}, ValueError, "weights|inputs", "inputs-dim"),
    _p({"weights": lambda kw, c: kw["weights"][:, :5]}, ValueError, "weights|inputs", "w-dim"),
    _p(
        {"weights": lambda kw, c: kw["weights"][:40]},
        ValueError,
        "weights|num_classes",
        "weights-too-few-rows",
    ),
    _p(
        {"weights": lambda kw, c: [kw["weights"][:20], kw["weights"][20:]]},
        ValueError,
        "weights",
        "weights-not-a-layout",
    ),
    _p({"biases": lambda kw, c: kw["biases"][:, None]}, ValueError, "biases", "biases-2d"),
    _p(
        {"biases": lambda kw, c: kw["biases"][:30]},
        ValueError,
        "biases|num_classes",
        "biases-too-few-rows",
    ),
    _p({"partition_strategy": "modulo"}, ValueError, "partition_strategy", "strategy"),
    _p(
        {
            "weights": lambda kw, c: sampler.routing.split_rows(kw["weights"], 3, "mod"),
            "partition_strategy": "range",
        },
        ValueError,
        "partition_strategy",
        "strategy-sharded",
    ),
    _p({"num_true": 0}, ValueError, "num_true", "num-true-0"),
    _p({"num_sampled": 0, "sampled_values": None}, ValueError, "num_sampled", "num-sampled-0"),
    _p(
        {"num_sampled": 51, "sampled_values": None},
        ValueError,
        "num_sampled",
        "num-sampled-gt-num-classes",
    ),
    _p(
        {"num_sampled": 19},
        ValueError,
        "sampled_values|num_sampled|sampled_candidates",
        "num-sampled-vs-sampled-values",
    ),
    _p(
        {"sampled_values": lambda kw, c: tuple(kw["sampled_values"])[:2]},
        ValueError,
        "sampled_values",
        "sampled-values-len-2",
    ),
    _p({"sampled_values": _sv_with(0, lambda t: t[:, None])}, ValueError, "sampled", "cand-2d"),
    _p({"sampled_values": _sv_with(0, lambda t: t.float())}, TypeError, "sampled", "cand-float"),
    _p(
        {"sampled_values": _sv_with(0, lambda t: t + 50)},
        ValueError,
        "sampled",
        "sampled-candidates-out-of-range",
    ),
    _p(
        {"sampled_values": _sv_with(1, lambda t: t[:, :1])},
        ValueError,
        "true_expected_count|sampled_values",
        "true-expected-count-shape",
    ),
    _p(
        {"sampled_values": _sv_with(2, lambda t: t[:3])},
        ValueError,
        "sampled_expected_count|sampled_values",
        "sampled-expected-count-shape",
    ),
]


@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize(("over", "exc", "match"), ERRORS)
def test_argument_errors(kind, over, exc, match):
    with pytest.raises(exc, match=match):
        _call(kind, **over)


def test_compute_sampled_logits_errors():
    case = make_case(98, 1)
    args = [*_case_tensors(case), case.num_sampled, case.num_classes]
    with pytest.raises(ValueError, match="partition_strategy"):
        sampler.compute_sampled_logits(*args, sampled_values=_sv(case), partition_strategy="x")
    bad = list(args)
    bad[2] = torch.full((8, 1), 50)
    with pytest.raises(ValueError, match="labels"):
        sampler.compute_sampled_logits(*bad, sampled_values=_sv(case))


def test_unchecked_skips_value_checks_only():
    case = make_case(97, 1)
    labels = torch.from_numpy(case.labels).clone()
    labels[0, 0] = 1000
    with sampler.unchecked():
        # the sampler only needs the true classes for their expected counts
        sv = sampler.uniform_candidate_sampler(labels, 1, 5, True, 50, seed=0)
        assert sv.true_expected_count.shape == (8, 1)
        with pytest.raises(TypeError, match="labels"):  # dtype checks still run
            _call(labels=lambda kw, c: kw["labels"].float())
    with pytest.raises(ValueError, match="true_classes"):
        sampler.uniform_candidate_sampler(labels, 1, 5, True, 50, seed=0)
