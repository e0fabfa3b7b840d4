"""The default path for nn.Parameter tables: sparse row gradients, sampler.SparseAdam, and the
error a dense-only optimizer gives; each against the dense path and torch's own optimizers."""

from __future__ import annotations

import pytest
import torch

import sampler
from tests.sampler.cases import make_case

LAYOUTS = [(0, "mod"), (3, "mod"), (3, "div")]


def _tables(case, num_shards, strategy, parameter=True):
    w = torch.from_numpy(case.weights).clone()
    ws = sampler.routing.split_rows(w, num_shards, strategy) if num_shards else [w]
    wrap = torch.nn.Parameter if parameter else (lambda t: t.clone().requires_grad_())
    return [wrap(s.clone()) for s in ws], wrap(torch.from_numpy(case.biases).clone())


def _train(opt_cls, sparse_grad=None, num_shards=0, strategy="mod", steps=3, kind="softmax", **kw):
    """A few seeded steps; returns the final (weights [C, D], biases [C]) and the losses."""
    case = make_case(80 + num_shards, 2)
    ws, b = _tables(case, num_shards, strategy)
    opt = opt_cls([*ws, b], **kw)
    loss_fn = sampler.sampled_softmax_loss if kind == "softmax" else sampler.nce_loss
    gen = torch.Generator().manual_seed(5)
    labels, x = torch.from_numpy(case.labels), torch.from_numpy(case.inputs)
    losses = []
    for _ in range(steps):
        loss = loss_fn(
            ws if num_shards else ws[0],
            b,
            labels,
            x,
            10,
            case.num_classes,
            num_true=2,
            partition_strategy=strategy,
            seed=gen,
            sparse_grad=sparse_grad,
        ).mean()
        opt.zero_grad()
        loss.backward()
        assert all(t.grad.is_sparse == (sparse_grad is not False) for t in [*ws, b])
        opt.step()
        losses.append(loss.item())
    w = sampler.routing.join_rows([t.detach() for t in ws], strategy) if num_shards else ws[0]
    return w.detach(), b.detach(), losses


@pytest.mark.parametrize("kind", ["softmax", "nce"])
@pytest.mark.parametrize(("num_shards", "strategy"), LAYOUTS)
def test_default_sgd_equals_dense_path(kind, num_shards, strategy):
    sparse = _train(torch.optim.SGD, None, num_shards, strategy, kind=kind, lr=0.5)
    dense = _train(torch.optim.SGD, False, num_shards, strategy, kind=kind, lr=0.5)
    assert sparse[2] == pytest.approx(dense[2], rel=1e-6)
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sparse[1], dense[1], rtol=1e-6, atol=1e-7)
    case = make_case(80 + num_shards, 2)
    assert not torch.allclose(sparse[0], torch.from_numpy(case.weights))


@pytest.mark.parametrize(("num_shards", "strategy"), LAYOUTS)
@pytest.mark.parametrize("maximize", [False, True])
def test_sparse_adam_equals_torch_sparse_adam(num_shards, strategy, maximize):
    kw = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6, "maximize": maximize}
    ours = _train(sampler.SparseAdam, None, num_shards, strategy, steps=4, **kw)
    want = _train(torch.optim.SparseAdam, None, num_shards, strategy, steps=4, **kw)
    assert ours[2] == want[2]
    torch.testing.assert_close(ours[0], want[0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ours[1], want[1], rtol=1e-6, atol=1e-8)


def test_sparse_adam_coalesces_unsorted_gradients():
    """nn.Embedding(sparse=True) gives duplicate, unsorted rows: same update as torch's."""
    ids = torch.tensor([[7, 2, 7], [0, 2, 9]])
    up = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    out = []
    for cls in (sampler.SparseAdam, torch.optim.SparseAdam):
        emb = torch.nn.Embedding(12, 4, sparse=True)
        with torch.no_grad():
            emb.weight.copy_(torch.arange(48.0).view(12, 4) / 48)
        opt = cls(emb.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            (emb(ids) * up).sum().backward()
            opt.step()
        out.append(emb.weight.detach())
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out[0][1], torch.arange(4.0, 8.0) / 48)  # row 1: untouched
    assert not torch.equal(out[0][7], torch.arange(28.0, 32.0) / 48)


def test_sparse_adam_rejects_dense_gradients():
    with pytest.raises(RuntimeError, match="needs sparse gradients"):
        _train(sampler.SparseAdam, False, lr=0.1)


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop])
def test_dense_only_optimizer_gets_a_clear_error(opt_cls):
    with pytest.raises(TypeError, match="sparse_grad=False"):
        _train(opt_cls, None, lr=0.1)
    w, _, _ = _train(opt_cls, False, lr=0.1)  # the documented way out works
    assert torch.isfinite(w).all()


def test_plain_tensors_keep_dense_gradients():
    """Rows pulled or computed in a step (the trainers' leaves) are not nn.Parameters."""
    case = make_case(91, 1)
    ws, b = _tables(case, 0, "mod", parameter=False)
    x = torch.from_numpy(case.inputs)
    loss = sampler.sampled_softmax_loss(ws[0], b, torch.from_numpy(case.labels), x, 10, 50)
    loss.sum().backward()
    assert ws[0].grad.layout == torch.strided and b.grad.layout == torch.strided
