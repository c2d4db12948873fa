"""`rel_pos_attention` (the CPU training path), `augmented_attention` (the bias folded into q . k) and
`attention_in_row_blocks` (the mask a block of query rows at a time) against SDPA with the whole
`rel_pos_bias` mask: same values (and gradients), 2D and 3D, with and without a prefix token, float64 /
float32 / bf16 autocast; the training path keeps no (Nq, Nk) tensor for the backward."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mvit_zoo.ops import attention, memory as fused
from mvit_zoo.ops.attention import (attention_in_row_blocks, augment_qk, augmented_attention, mask_in_row_blocks_pays,
                                rel_pos_attention, rel_pos_bias)

CASES = [  # q grid, k grid, prefix tokens, axes with a table
    ([4, 3], [2, 3], 0, [0, 1]),
    ([4, 4], [2, 2], 1, [0, 1]),
    ([2, 4, 3], [2, 2, 3], 1, [0, 1, 2]),
    ([2, 4, 3], [1, 2, 3], 0, [1, 2]),  # no temporal table
]


def _inputs(q_grid, k_grid, prefix, axes, dtype, heads=2, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_q, n_k = math.prod(q_grid) + prefix, math.prod(k_grid) + prefix
    q, k, v = (torch.randn(2, heads, n, d, generator=g, dtype=dtype) for n in (n_q, n_k, n_k))
    rel = [torch.randn(qs, ks, d, generator=g, dtype=dtype) if a in axes else None
           for a, (qs, ks) in enumerate(zip(q_grid, k_grid))]
    return q, k, v, rel


def _reference(q, k, v, q_grid, k_grid, rel, prefix):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=rel_pos_bias(q, q_grid, k_grid, rel, prefix), scale=0.3)


@pytest.mark.parametrize("q_grid,k_grid,prefix,axes", CASES)
def test_gradcheck_float64(q_grid, k_grid, prefix, axes) -> None:
    q, k, v, rel = _inputs(q_grid, k_grid, prefix, axes, torch.float64)
    tables = [r for r in rel if r is not None]
    for t in (q, k, v, *tables):
        t.requires_grad_(True)

    def fn(q, k, v, *tables):
        it = iter(tables)
        return rel_pos_attention(q, k, v, 0.3, q_grid, k_grid, [next(it) if r is not None else None for r in rel], prefix)

    assert torch.allclose(fn(q, k, v, *tables), _reference(q, k, v, q_grid, k_grid, rel, prefix))
    assert torch.autograd.gradcheck(fn, (q, k, v, *tables))


def _grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    out.float().mul(torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16_autocast"])
def test_matches_sdpa_float32_and_autocast(dtype, tol) -> None:
    q_grid, k_grid, prefix = [2, 4, 4], [2, 2, 2], 1
    q, k, v, rel = _inputs(q_grid, k_grid, prefix, [0, 1, 2], torch.float32, d=8)
    tensors = [q, k, v, *rel]

    def ours(q, k, v, *rel):
        return rel_pos_attention(q, k, v, 0.3, q_grid, k_grid, list(rel), prefix)

    def ref(q, k, v, *rel):
        if dtype != torch.float32:  # what the model's SDPA path computes under autocast
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            rel = [r.to(dtype) for r in rel]
        return _reference(q, k, v, q_grid, k_grid, list(rel), prefix)

    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out, grads = _grads(ours, tensors)
        ref_out, ref_grads = _grads(ref, tensors)
    assert out.dtype == ref_out.dtype == dtype
    scale = lambda t: t.float().abs().max().item()  # noqa: E731
    assert (out.float() - ref_out.float()).abs().max().item() <= tol * scale(ref_out)
    for name, a, b in zip(["q", "k", "v", "t", "h", "w"], grads, ref_grads):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).abs().max().item() <= tol * scale(b), name


def test_keeps_no_attention_sized_tensor_for_backward() -> None:
    """SDPA with a bias that needs a gradient keeps (B, heads, Nq, Nk) tensors; this keeps none."""
    q_grid, k_grid = [16, 16], [4, 8]
    q, k, v, rel = _inputs(q_grid, k_grid, 0, [0, 1], torch.float32, d=8)
    for t in (q, k, v, *rel):
        t.requires_grad_(True)

    def saved_shapes(fn):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            fn()
        return shapes

    attn_shape = (2, 2, 256, 32)
    assert attn_shape in saved_shapes(lambda: _reference(q, k, v, q_grid, k_grid, rel, 0))
    assert attn_shape not in saved_shapes(lambda: rel_pos_attention(q, k, v, 0.3, q_grid, k_grid, rel, 0))


@pytest.mark.parametrize("q_grid,k_grid,prefix,axes", CASES)
def test_bias_without_autograd_equals_bias_with(q_grid, k_grid, prefix, axes) -> None:
    """Without autograd the bias (with prefix) is written in one pass into its padded buffer; same values."""
    q, _, _, rel = _inputs(q_grid, k_grid, prefix, axes, torch.float32)
    with torch.no_grad():
        fast = rel_pos_bias(q, q_grid, k_grid, rel, prefix)
    assert torch.equal(fast, rel_pos_bias(q, q_grid, k_grid, rel, prefix))
    assert (fast[:, :, :prefix] == 0).all() and (fast[:, :, :, :prefix] == 0).all()


@pytest.mark.parametrize("q_grid,k_grid,prefix,axes", CASES)
def test_augmented_logits_are_logits_plus_bias(q_grid, k_grid, prefix, axes) -> None:
    q, k, v, rel = _inputs(q_grid, k_grid, prefix, axes, torch.float64)
    q_aug, k_aug = augment_qk(q, k, 0.3, q_grid, k_grid, rel, prefix)
    logits = q @ k.transpose(-2, -1) * 0.3 + rel_pos_bias(q, q_grid, k_grid, rel, prefix)
    torch.testing.assert_close(q_aug @ k_aug.transpose(-2, -1) * 0.3, logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("q_grid,k_grid,prefix,axes", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16_autocast"])
def test_augmented_attention_matches_sdpa_with_mask(q_grid, k_grid, prefix, axes, dtype, tol) -> None:
    q, k, v, rel = _inputs(q_grid, k_grid, prefix, axes, torch.float32, d=8)
    if dtype != torch.float32:  # as in the model under autocast: bf16 q, k, v and float32 tables
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = augmented_attention(q, k, v, 0.3, q_grid, k_grid, rel, prefix)
        ref = _reference(q, k, v, q_grid, k_grid, [r if r is None else r.to(dtype) for r in rel], prefix)
    assert out.shape == ref.shape and out.dtype == ref.dtype == dtype
    assert (out.float() - ref.float()).abs().max().item() <= tol * ref.float().abs().max().item()
    if dtype != torch.float32:  # 16-bit heads are padded to a multiple of 32
        assert augment_qk(q, k, 0.3, q_grid, k_grid, rel, prefix)[0].shape[-1] % 32 == 0


@pytest.mark.parametrize("q_grid,k_grid,prefix,axes", CASES)
@pytest.mark.parametrize("rows", [1, 3, 5, 1000])
def test_attention_in_row_blocks_matches_sdpa_with_mask(q_grid, k_grid, prefix, axes, rows) -> None:
    """Blocks of 1, 3, 5 query rows (a first block with the prefix row and grid rows, a short last block)
    and one block holding every row."""
    q, k, v, rel = _inputs(q_grid, k_grid, prefix, axes, torch.float32, d=8)
    block_bytes = rows * q.shape[0] * q.shape[1] * k.shape[2] * q.element_size()
    with torch.no_grad():
        out = attention_in_row_blocks(q, k, v, 0.3, q_grid, k_grid, rel, prefix, block_bytes)
        ref = _reference(q, k, v, q_grid, k_grid, rel, prefix)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert out.transpose(1, 2).is_contiguous()  # SDPA's (B, L, heads, d) layout: merging heads is a view


def test_mask_in_row_blocks_only_above_fresh_pages_size_without_autograd(monkeypatch) -> None:
    q, k = torch.randn(2, 2, 64, 8), torch.randn(2, 2, 32, 8)
    mask_bytes = 2 * 2 * 64 * 32 * 4
    monkeypatch.setattr(fused, "FRESH_PAGES_BYTES", mask_bytes - 1)
    with torch.no_grad():
        assert mask_in_row_blocks_pays(q, k)
    assert not mask_in_row_blocks_pays(q, k)  # autograd records: the training paths decide
    monkeypatch.setattr(fused, "FRESH_PAGES_BYTES", mask_bytes)
    with torch.no_grad():
        assert not mask_in_row_blocks_pays(q, k)


def test_explicit_backward_equals_kernel_backward_float32() -> None:
    """The GEMM backward of the 16-bit path is the same math as SDPA's CPU kernel backward."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 20, 12, generator=g), torch.randn(2, 3, 9, 12, generator=g)
    v, d_out = torch.randn(2, 3, 9, 12, generator=g), torch.randn(2, 3, 20, 12, generator=g)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=0.3)
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(d_out, q, k, v, out, lse, 0.0, False, scale=0.3)
    for ours, ref in zip(attention._explicit_backward(d_out, q, k, v, 0.3), kernel):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_grid,k_grid,prefix,axes", CASES)
def test_bf16_training_gradients_as_accurate_as_the_kernel(q_grid, k_grid, prefix, axes, monkeypatch) -> None:
    """bf16 gradients of `rel_pos_attention` through the explicit backward (these sizes take it) and through
    the kernel's, against float64 on the same (bf16-representable) inputs, `.backward()` called inside
    the autocast region: the relative RMS error of each gradient within 1.1x the kernel's."""
    q, k, v, rel = _inputs(q_grid, k_grid, prefix, axes, torch.float64, heads=4, d=32)
    tensors = [t.to(torch.bfloat16).double() for t in [q, k, v] + [r for r in rel if r is not None]]

    def fn(q, k, v, *tables):
        it = iter(tables)
        return rel_pos_attention(q, k, v, 0.3, q_grid, k_grid, [next(it) if r is not None else None for r in rel], prefix)

    _, exact = _grads(fn, tensors)
    calls = []
    explicit = attention._explicit_backward
    monkeypatch.setattr(attention, "_explicit_backward", lambda *a: calls.append(1) or explicit(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ours = _grads(fn, [t.float() for t in tensors])
        assert calls, "these sizes take the explicit backward in bf16"
        monkeypatch.setattr(attention, "EXPLICIT_BACKWARD_MAX", 0)
        _, kernel = _grads(fn, [t.float() for t in tensors])
    assert len(calls) == 1
    for a, b, ref in zip(ours, kernel, exact):
        err = lambda t: ((t.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        assert err(a) <= 1.1 * err(b), (err(a), err(b))


def test_fp16_keeps_the_kernel_backward(monkeypatch) -> None:
    """fp16's small dS entries would lose digits in the GEMM backward's 16-bit inputs: fp16 stays on the kernel."""
    q_grid, k_grid, prefix, axes = CASES[0]
    q, k, v, rel = _inputs(q_grid, k_grid, prefix, axes, torch.float32, d=16)
    monkeypatch.setattr(attention, "_explicit_backward", lambda *a: pytest.fail("took the GEMM backward"))
    with torch.autocast("cpu", dtype=torch.float16):
        _grads(lambda q, k, v: rel_pos_attention(q, k, v, 0.3, q_grid, k_grid, rel, prefix), [q, k, v])
