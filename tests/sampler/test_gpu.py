"""The sampler package on CUDA: results stay on the device and equal the CPU results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sampler
from tests.sampler import reference as ref
from tests.sampler.cases import loss_kwargs, make_case, reference_loss
from tests.sampler.checks import assert_reused_sampler_reproduces

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CUDA = torch.device("cuda")
LOSSES = {"softmax": sampler.sampled_softmax_loss, "nce": sampler.nce_loss}


def _run(kind, case, device, num_shards, strategy, remove, dtype=torch.float32, sparse=False):
    w_np = case.weight_shards(num_shards, strategy)
    if isinstance(w_np, list):
        w = [torch.tensor(s, device=device, dtype=dtype, requires_grad=True) for s in w_np]
    else:
        w = torch.tensor(w_np, device=device, dtype=dtype, requires_grad=True)
    b = torch.tensor(case.biases, device=device, dtype=dtype, requires_grad=True)
    x = torch.tensor(case.inputs, device=device, dtype=dtype, requires_grad=True)
    loss = LOSSES[kind](
        **loss_kwargs(
            case,
            lambda a: torch.from_numpy(a).to(device),
            w,
            b,
            x,
            remove_accidental_hits=remove,
            partition_strategy=strategy,
            sparse_grad=sparse,
        )
    )
    assert loss.device.type == device.type
    (loss * torch.from_numpy(case.upstream).to(device, loss.dtype)).sum().backward()
    leaves = w if isinstance(w, list) else [w]
    for t in [*leaves, b, x]:
        assert t.grad.device.type == device.type
    return {
        "loss": loss.detach().double().cpu().numpy(),
        "inputs": x.grad.double().cpu().numpy(),
        "weights": [t.grad.to_dense().double().cpu().numpy() for t in leaves],
        "biases": b.grad.to_dense().double().cpu().numpy(),
    }


@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize("num_true", [1, 3])
@pytest.mark.parametrize(("num_shards", "strategy"), [(0, "mod"), (3, "mod"), (3, "div")])
@pytest.mark.parametrize("remove", [True, False])
@pytest.mark.parametrize("sparse", [False, True])
def test_losses_on_cuda_equal_cpu(kind, num_true, num_shards, strategy, remove, sparse):
    case = make_case(300 + num_true, num_true, unique=bool(num_true % 2))
    gpu = _run(kind, case, CUDA, num_shards, strategy, remove, sparse=sparse)
    cpu = _run(kind, case, torch.device("cpu"), num_shards, strategy, remove)
    for key in ("loss", "inputs", "biases"):
        np.testing.assert_allclose(gpu[key], cpu[key], rtol=1e-5, atol=1e-6)
    for g, c in zip(gpu["weights"], cpu["weights"]):
        np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-6)
    want = reference_loss(kind, case, remove=remove)
    np.testing.assert_allclose(gpu["loss"], want["loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["softmax", "nce"])
def test_half_precision_on_cuda(dtype, kind):
    case = make_case(310, 2)
    got = _run(kind, case, CUDA, 0, "mod", True, dtype=dtype)
    for v in got.values():
        for a in v if isinstance(v, list) else [v]:
            assert np.isfinite(a).all()
    want = _run(kind, case, torch.device("cpu"), 0, "mod", True)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=8e-2, atol=8e-2)


def test_default_sampler_on_cuda():
    case = make_case(320, 2)
    w = torch.from_numpy(case.weights).to(CUDA)
    b = torch.from_numpy(case.biases).to(CUDA)
    labels = torch.from_numpy(case.labels).to(CUDA)
    x = torch.from_numpy(case.inputs).to(CUDA)
    a = sampler.sampled_softmax_loss(w, b, labels, x, 20, 50, num_true=2, seed=3)
    c = sampler.sampled_softmax_loss(w, b, labels, x, 20, 50, num_true=2, seed=3)
    assert a.device.type == "cuda" and torch.isfinite(a).all()
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    m = sampler.SampledSoftmaxLoss(20, 50, 2, seed=1, reduction="mean")
    assert m(w, b, labels, x).device.type == "cuda"


@pytest.mark.parametrize(
    "make",
    [
        lambda: sampler.UniformSampler(60),
        lambda: sampler.LogUniformSampler(60),
        lambda: sampler.FixedUnigramSampler(60, unigrams=[float(i % 5 + 1) for i in range(60)]),
        lambda: sampler.LearnedUnigramSampler(60),
    ],
    ids=["uniform", "log_uniform", "fixed", "learned"],
)
@pytest.mark.parametrize("unique", [True, False])
def test_samplers_on_cuda(make, unique):
    smp = make()
    labels = torch.tensor([[0, 3], [5, 59]], device=CUDA)
    p_before = smp.probability(torch.arange(60)).numpy()
    out = smp.sample(labels, 2, 40, unique, 7)
    for t in out:
        assert t.device.type == "cuda"
    ids = out.sampled_candidates.cpu().numpy()
    assert out.sampled_candidates.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() < 60
    if unique:
        assert len(set(ids.tolist())) == 40
        p = p_before[ids]
        ec = out.sampled_expected_count.cpu().numpy()
        assert any(
            np.allclose(ref.expected_count(p, 40, t), ec, rtol=3e-7, atol=0)
            for t in range(40, 5000)
        )
    else:
        np.testing.assert_allclose(
            out.sampled_expected_count.cpu().numpy(),
            ref.expected_count(p_before[ids], 40, 40),
            rtol=3e-7,
        )
    if not isinstance(smp, sampler.LearnedUnigramSampler):
        again = smp.sample(labels, 2, 40, unique, 7)
        for u, v in zip(out, again):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [sampler.UniformSampler, sampler.LogUniformSampler])
def test_int_seed_reproduces_on_a_reused_sampler_object_cuda(cls):
    assert_reused_sampler_reproduces(cls(60), torch.tensor([[1]], device=CUDA), 1)


def test_large_range_on_cuda():
    r = 2**40
    for fn in (sampler.uniform_candidate_sampler, sampler.log_uniform_candidate_sampler):
        out = fn(torch.tensor([[r - 1]], device=CUDA), 1, 1000, True, r, seed=0)
        ids = out.sampled_candidates
        assert ids.device.type == "cuda" and ids.dtype == torch.int64
        assert int(ids.min()) >= 0 and int(ids.max()) < r and int(ids.max()) > 2**31
        assert len(set(ids.tolist())) == 1000


def test_compute_accidental_hits_and_embedding_lookup_on_cuda():
    rng = np.random.default_rng(0)
    sampled = rng.integers(0, 12, 15)
    labels = rng.integers(0, 12, (6, 3))
    got = sampler.compute_accidental_hits(
        torch.from_numpy(labels).to(CUDA), torch.from_numpy(sampled).to(CUDA), 3
    )
    for g, w in zip(got, ref.compute_accidental_hits(labels, sampled, 3)):
        assert g.device.type == "cuda"
        np.testing.assert_array_equal(g.cpu().numpy(), w)
    table = rng.normal(size=(11, 4)).astype(np.float32)
    ids = rng.integers(0, 11, (3, 5))
    for strategy in ("mod", "div"):
        shards = [torch.from_numpy(s).to(CUDA) for s in ref.split_rows(table, 3, strategy)]
        out = sampler.embedding_lookup(shards, torch.from_numpy(ids).to(CUDA), strategy, 0.9)
        assert out.device.type == "cuda"
        np.testing.assert_allclose(
            out.cpu().numpy(), ref.embedding_lookup(table, ids, max_norm=0.9), rtol=1e-6
        )
    with pytest.raises(ValueError, match="ids"):
        sampler.embedding_lookup(shards, torch.from_numpy(ids).to(CUDA) + 11, "div")
    with pytest.raises(ValueError, match="device"):
        sampler.embedding_lookup(shards, torch.from_numpy(ids), "div")


def test_sparse_adam_on_cuda():
    case = make_case(330, 1)
    w = torch.nn.Parameter(torch.from_numpy(case.weights).to(CUDA))
    b = torch.nn.Parameter(torch.from_numpy(case.biases).to(CUDA))
    opt = torch.optim.SparseAdam([w, b], lr=0.01)
    labels = torch.from_numpy(case.labels).to(CUDA)
    x = torch.from_numpy(case.inputs).to(CUDA)
    for step in range(3):
        loss = sampler.sampled_softmax_loss(w, b, labels, x, 20, 50, seed=step, sparse_grad=True)
        opt.zero_grad()
        loss.mean().backward()
        assert w.grad.layout == torch.sparse_coo
        opt.step()
    assert torch.isfinite(w).all() and w.device.type == "cuda"
