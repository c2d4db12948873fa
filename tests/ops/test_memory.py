"""`mvit_zoo.ops.memory` against the plain modules: `norm_mlp`, `norm_linears`, `depthwise_conv` and
`residual_linear` give the same values and gradients in float64 (gradcheck), float32 and bf16 autocast,
without biases too, and keep for the backward only what they say they keep; `norm_mlp`'s inference row
blocks give the same values."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mvit_zoo.ops.memory import depthwise_conv, norm_linears, norm_mlp


def _params(dtype, c=6, hidden=12, c_out=5, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return [1 + 0.1 * r(c), 0.1 * r(c), r(hidden, c) * 0.3, r(hidden) * 0.1 if bias else None,
            r(c_out, hidden) * 0.3, r(c_out) * 0.1 if bias else None]


def _plain(x, nw, nb, w1, b1, w2, b2, eps=1e-6):
    return F.linear(F.gelu(F.linear(F.layer_norm(x, x.shape[-1:], nw, nb, eps), w1, b1)), w2, b2)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias: bool) -> None:
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_(True) if p is not None else None for p in _params(torch.float64, bias=bias)]

    def fn(x, *given):
        it = iter(given)
        p = [next(it) if q is not None else None for q in params]
        return norm_mlp(x, p[0], p[1], 1e-6, *p[2:])

    tensors = [p for p in params if p is not None]
    assert torch.allclose(fn(x, *tensors), _plain(x, *params))
    assert torch.autograd.gradcheck(fn, (x, *tensors))


def _grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    out.float().mul(torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("autocast,tol", [(False, 1e-5), (True, 2e-2)], ids=["fp32", "bf16_autocast"])
def test_matches_plain_modules(autocast: bool, tol: float) -> None:
    x = torch.randn(4, 10, 6)
    tensors = [x, *_params(torch.float32)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, grads = _grads(lambda x, *p: norm_mlp(x, p[0], p[1], 1e-6, *p[2:]), tensors)
        ref, ref_grads = _grads(_plain, tensors)
    assert out.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert (out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    for name, a, b in zip(["x", "norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
                          grads, ref_grads):
        assert a.dtype == b.dtype
        assert (a - b).abs().max() <= tol * b.abs().max(), name


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_row_blocks_match_plain_modules(monkeypatch, autocast: bool, bias: bool) -> None:
    """CPU inference ('rows'): the same values as the plain modules, here 16 hidden rows at a time (a short
    last block) through one buffer, and the dispatch chooses it only without autograd."""
    from mvit_zoo.ops import dispatch, memory

    x = torch.randn(3, 13, 6)  # 39 rows
    params = _params(torch.float32, hidden=12, bias=bias)
    monkeypatch.setattr(memory, "ROW_BLOCK_BYTES", 16 * 12 * (2 if autocast else 4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert dispatch.select("norm_mlp", x) == "rows"
        out, ref = norm_mlp(x, params[0], params[1], 1e-6, *params[2:]), _plain(x, *params)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    assert dispatch.select("norm_mlp", x.requires_grad_()) == "recompute"


def test_keeps_only_input_and_fc1_output() -> None:
    x = torch.randn(4, 50, 6, requires_grad=True)
    params = [p.requires_grad_(True) for p in _params(torch.float32)]

    def saved_bytes(fn) -> int:
        storages = {}
        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(storages.values())

    fused = saved_bytes(lambda: norm_mlp(x, params[0], params[1], 1e-6, *params[2:]))
    plain = saved_bytes(lambda: _plain(x, *params))
    activations = x.numel() * 4  # bytes of x; hidden is 2x
    weights = sum(p.numel() * 4 for p in params)
    assert fused <= activations * (1 + 2) + weights + 2 * 4 * 200  # x, fc1 output, weights, mean/rstd
    assert plain >= activations * (1 + 1 + 2 + 2)  # x, norm output, fc1 and GELU outputs


# -- depthwise_conv -------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,stride", [((2, 4, 6, 5), [2, 1]), ((1, 3, 3, 6, 5), [1, 2, 2])], ids=["2d", "3d"])
def test_depthwise_conv_gradcheck(shape, stride) -> None:
    nd = len(shape) - 2
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn((shape[1], 1) + (3,) * nd, dtype=torch.float64, requires_grad=True)
    conv = F.conv2d if nd == 2 else F.conv3d
    padding = [1] * nd
    assert torch.allclose(depthwise_conv(x, w, stride, padding), conv(x, w, None, stride, padding, 1, shape[1]))
    assert torch.autograd.gradcheck(lambda x, w: depthwise_conv(x, w, stride, padding), (x, w))


def test_depthwise_conv_bf16_autocast_grads_are_float32_accurate() -> None:
    """Under bf16 autocast the forward is autocast's bf16 conv; the gradients are computed in float32
    from the same bf16 inputs, so they are at least as close to the float32 truth as bf16 conv's own."""
    x = torch.randn(2, 8, 4, 12, 12).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(8, 1, 3, 3, 3)
    stride, padding = [1, 2, 2], [1, 1, 1]

    def run(fn, autocast):
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(xs, ws)
        out.float().mul(torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out, xs.grad, ws.grad

    plain = lambda x, w: F.conv3d(x, w, None, stride, padding, 1, 8)  # noqa: E731
    ours = lambda x, w: depthwise_conv(x, w, stride, padding)  # noqa: E731
    truth = run(plain, False)
    low, ref_low = run(ours, True), run(plain, True)
    assert low[0].dtype == ref_low[0].dtype == torch.bfloat16
    assert torch.equal(low[0], ref_low[0])  # same forward
    for a, b, t in zip(low[1:], ref_low[1:], truth[1:]):
        assert a.dtype == b.dtype == torch.float32
        assert (a - t).abs().max() <= (b - t).abs().max() * 1.01 + 1e-6


# -- norm_linears ---------------------------------------------------------------------------------

def test_norm_linears_gradcheck_with_unused_output() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    nw, nb = ((1 + 0.1 * torch.randn(6, dtype=torch.float64, generator=g)).requires_grad_(),
              torch.zeros(6, dtype=torch.float64, requires_grad=True))
    ws = [torch.randn(o, 6, dtype=torch.float64, generator=g, requires_grad=True) for o in (4, 4, 5)]
    b0 = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)

    def fn(x, nw, nb, w0, w1, w2, b0):
        q, k, v = norm_linears(x, nw, nb, 1e-6, [w0, w1, w2], [b0, None, None])
        return q.sum(-1, keepdim=True) * v  # k unused: its gradient is None
    def plain(x, nw, nb, w0, w1, w2, b0):
        xn = F.layer_norm(x, (6,), nw, nb, 1e-6)
        return F.linear(xn, w0, b0).sum(-1, keepdim=True) * F.linear(xn, w2)

    args = (x, nw, nb, *ws, b0)
    assert torch.allclose(fn(*args), plain(*args))
    assert torch.autograd.gradcheck(fn, args)


def test_norm_linears_bf16_autocast_matches_plain() -> None:
    x = torch.randn(4, 10, 6)
    params = _params(torch.float32)
    nw, nb, w1, b1 = params[:4]
    tensors = [x, nw, nb, w1, b1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _grads(lambda x, nw, nb, w, b: norm_linears(x, nw, nb, 1e-6, [w], [b])[0], tensors)
        ref, ref_grads = _grads(lambda x, nw, nb, w, b: F.linear(F.layer_norm(x, (6,), nw, nb, 1e-6), w, b), tensors)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == b.dtype and (a - b).abs().max() <= 2e-2 * b.abs().max()


def test_norm_linears_keeps_a_bf16_input_in_bf16_under_autocast() -> None:
    """A bf16 residual stream is kept as it is (not as the float32 copy the norm runs on); same results."""
    torch.manual_seed(0)  # (the inputs, and _params' draws)
    x = torch.randn(4, 10, 6).to(torch.bfloat16)
    params = _params(torch.float32)
    nw, nb, w1, b1 = params[:4]
    tensors = [x, nw, nb, w1, b1]
    kept = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out, grads = _grads(lambda x, nw, nb, w, b: norm_linears(x, nw, nb, 1e-6, [w], [b])[0], tensors)
        ref, ref_grads = _grads(lambda x, nw, nb, w, b: F.linear(F.layer_norm(x, (6,), nw, nb, 1e-6), w, b), tensors)
    assert not [t for t in kept if t.shape == x.shape and t.dtype != torch.bfloat16]
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        # NOTE: the gradients come through bf16 GEMMs (8-bit mantissas) rounded at other points than the
        # reference's; over 60 seeds the norm weight's sum over rows differed by up to 4.1% of its largest value
        assert a.dtype == b.dtype and (a.float() - b.float()).abs().max() <= 5e-2 * b.float().abs().max()


@pytest.mark.parametrize("skip,with_residual", [(0, True), (1, True), (0, False)],
                         ids=["all_rows", "skip_prefix", "no_residual"])
def test_residual_linear_gradcheck_and_keeps_no_sum(skip, with_residual) -> None:
    from mvit_zoo.ops.memory import residual_linear

    g = torch.Generator().manual_seed(0)
    out, res = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(7, 12, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)

    def plain(out, res, weight, bias):
        if with_residual:
            out = torch.cat((out[:, :, :skip], out[:, :, skip:] + res[:, :, skip:]), 2)
        return F.linear(out.transpose(1, 2).reshape(2, 5, 12), weight, bias)

    def fused(out, res, weight, bias):
        return residual_linear(out, res if with_residual else None, skip, weight, bias)

    assert torch.allclose(fused(out, res, weight, bias), plain(out, res, weight, bias))
    assert torch.autograd.gradcheck(fused, (out, res, weight, bias))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = fused(out, res, weight, bias)
    assert all(t is out or t is res or t is weight for t in kept)
    y += 1  # the output is not a view: the block adds its shortcut in place


@pytest.mark.parametrize("shape,kernel,stride",
                         [((2, 3, 7, 6), [3, 3], [2, 2]), ((1, 2, 3, 6, 5), [1, 3, 3], [1, 2, 2])],
                         ids=["2d", "3d"])
def test_max_pool_same_gradients_keeps_no_indices(shape, kernel, stride) -> None:
    from mvit_zoo.ops.memory import max_pool
    padding = [k // 2 for k in kernel]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    plain = F.max_pool2d if len(shape) == 4 else F.max_pool3d
    assert torch.autograd.gradcheck(lambda x: max_pool(x, kernel, stride, padding), (x,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        out = max_pool(x, kernel, stride, padding)
    assert torch.int64 not in saved
    assert torch.equal(out, plain(x, kernel, stride, padding))
