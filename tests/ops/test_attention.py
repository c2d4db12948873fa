"""Every implementation of `mvit_zoo.ops.attention.attention` against the explicit reference
(softmax(q k^T * scale + rel_pos_bias) v): same values and gradients, 2D and 3D, with and without a
prefix token, float64 / float32 / bf16 autocast; which one the dispatch picks; CUDA kernels (skipped
without a GPU) run fused, not the math fallback."""
from __future__ import annotations

import math

import pytest
import torch

from mvit_zoo.ops import attention as ops_attention, dispatch, memory
from mvit_zoo.ops.attention import (attention, augment_qk, augmented_attention, cpu_flash_attention, explicit_attention,
                                    masked_attention_in_row_blocks, rel_pos_bias)

CASES = [  # q grid, k grid, prefix tokens, axes with a table
    ([4, 3], [2, 3], 0, [0, 1]),
    ([4, 4], [2, 2], 1, [0, 1]),
    ([2, 4, 3], [2, 2, 3], 1, [0, 1, 2]),
    ([2, 4, 3], [1, 2, 3], 0, [1, 2]),  # no temporal table
]
IDS = ["2d", "2d_cls", "3d_cls", "3d_no_t"]
SCALE = 0.3


def _inputs(q_grid, k_grid, prefix, axes, dtype, heads=2, d=5, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n_q, n_k = math.prod(q_grid) + prefix, math.prod(k_grid) + prefix
    q, k, v = (torch.randn(2, heads, n, d, generator=g, dtype=dtype).to(device) for n in (n_q, n_k, n_k))
    rel = [torch.randn(qs, ks, d, generator=g, dtype=dtype).to(device) if a in axes else None
           for a, (qs, ks) in enumerate(zip(q_grid, k_grid))]
    return q, k, v, rel


def _reference(q, k, v, q_grid, k_grid, rel, prefix):
    return explicit_attention(q, k, v, SCALE, rel_pos_bias(q, q_grid, k_grid, rel, prefix))


def _with_tables(fn, rel):
    """fn(q, k, v, rel) as a function of q, k, v and the tables that are not None."""
    def call(q, k, v, *tables):
        it = iter(tables)
        return fn(q, k, v, [next(it) if r is not None else None for r in rel])
    return call


def _grads(fn, tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    out.float().mul(torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum().backward()
    return out.detach(), [t.grad for t in tensors]


FAST = {
    "cpu_flash": cpu_flash_attention,
    "sdpa_augmented": augmented_attention,
}


@pytest.mark.parametrize("path", list(FAST))
@pytest.mark.parametrize("q_grid,k_grid,prefix,axes", CASES, ids=IDS)
def test_gradcheck_float64(path, q_grid, k_grid, prefix, axes) -> None:
    q, k, v, rel = _inputs(q_grid, k_grid, prefix, axes, torch.float64)
    tensors = [t.requires_grad_(True) for t in [q, k, v] + [r for r in rel if r is not None]]
    fn = _with_tables(lambda q, k, v, rel: FAST[path](q, k, v, SCALE, q_grid, k_grid, rel, prefix), rel)
    ref = _with_tables(lambda q, k, v, rel: _reference(q, k, v, q_grid, k_grid, rel, prefix), rel)
    torch.testing.assert_close(fn(*tensors), ref(*tensors), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("path", list(FAST))
@pytest.mark.parametrize("q_grid,k_grid,prefix,axes", CASES, ids=IDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2)], ids=["fp32", "bf16_autocast"])
def test_values_and_gradients_equal_the_explicit_path(path, q_grid, k_grid, prefix, axes, dtype, tol) -> None:
    """Under bf16 autocast against the reference on the bf16 q, k, v and tables autocast gives SDPA."""
    q, k, v, rel = _inputs(q_grid, k_grid, prefix, axes, torch.float32, d=8)
    tensors = [q, k, v] + [r for r in rel if r is not None]
    ours = _with_tables(lambda q, k, v, rel: FAST[path](q, k, v, SCALE, q_grid, k_grid, rel, prefix), rel)

    def ref(q, k, v, *tables):
        if dtype != torch.float32:
            q, k, v, tables = q.to(dtype), k.to(dtype), v.to(dtype), [t.to(dtype) for t in tables]
        with torch.autocast("cpu", enabled=False):
            return _with_tables(lambda q, k, v, rel: _reference(q, k, v, q_grid, k_grid, rel, prefix), rel)(
                q, k, v, *tables)

    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out, grads = _grads(ours, tensors)
        ref_out, ref_grads = _grads(ref, tensors)
    assert out.dtype == ref_out.dtype == dtype
    scale = lambda t: t.float().abs().max().item()  # noqa: E731
    assert (out.float() - ref_out.float()).abs().max().item() <= tol * scale(ref_out)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert a.dtype == b.dtype == torch.float32
        assert (a - b).abs().max().item() <= tol * scale(b), i


@pytest.mark.parametrize("q_grid,k_grid,prefix,axes", CASES, ids=IDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("block_bytes", [1, 3000, 1 << 30], ids=["one_row", "short_last_block", "one_block"])
def test_mask_in_row_blocks_equals_the_explicit_path(q_grid, k_grid, prefix, axes, dtype, tol, block_bytes,
                                                     monkeypatch) -> None:
    """Inference only: one query row per block, blocks with a short last one, the whole mask at once."""
    monkeypatch.setattr(memory, "ROW_BLOCK_BYTES", block_bytes)
    q, k, v, rel = _inputs(q_grid, k_grid, prefix, axes, dtype, d=8)
    with torch.no_grad():
        out = masked_attention_in_row_blocks(q, k, v, SCALE, q_grid, k_grid, rel, prefix)
        ref = _reference(q, k, v, q_grid, k_grid, rel, prefix)
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)


def test_cpu_flash_keeps_no_attention_sized_tensor_for_backward() -> None:
    """The explicit path (and SDPA's math fallback with a mask) keeps (B, heads, Nq, Nk) tensors; this none."""
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
    assert attn_shape not in saved_shapes(lambda: cpu_flash_attention(q, k, v, SCALE, q_grid, k_grid, rel, 0))


@pytest.mark.parametrize("q_grid,k_grid,prefix,axes", CASES, ids=IDS)
def test_augmented_logits_are_logits_plus_bias(q_grid, k_grid, prefix, axes) -> None:
    q, k, v, rel = _inputs(q_grid, k_grid, prefix, axes, torch.float64)
    q_aug, k_aug = augment_qk(q, k, SCALE, q_grid, k_grid, rel, prefix)
    logits = q @ k.transpose(-2, -1) * SCALE + rel_pos_bias(q, q_grid, k_grid, rel, prefix)
    torch.testing.assert_close(q_aug @ k_aug.transpose(-2, -1) * SCALE, logits, rtol=0, atol=1e-12)
    bias = rel_pos_bias(q, q_grid, k_grid, rel, prefix)
    assert (bias[:, :, :prefix] == 0).all() and (bias[:, :, :, :prefix] == 0).all()


def test_16bit_heads_are_padded_to_32() -> None:
    q, k, _, rel = _inputs([4, 3], [2, 3], 1, [0, 1], torch.bfloat16, d=8)
    assert augment_qk(q, k, SCALE, [4, 3], [2, 3], rel, 1)[0].shape[-1] % 32 == 0


@pytest.mark.parametrize("case,grad,fused,has_rel,dtype,expected", [
    (1, True, True, True, torch.float32, "cpu_flash"),
    (1, False, True, True, torch.float32, "sdpa_mask_rows"),  # CPU inference, float32, 2D
    (2, False, True, True, torch.float32, "sdpa_augmented"),  # video
    (1, False, True, True, torch.bfloat16, "sdpa_augmented"),  # 16-bit
    (1, True, False, True, torch.float32, "explicit"),
    (1, True, True, False, torch.float32, "sdpa"),
])
def test_dispatch_picks_the_documented_path(case, grad, fused, has_rel, dtype, expected, monkeypatch) -> None:
    q_grid, k_grid, prefix, axes = CASES[case]
    q, k, v, rel = _inputs(q_grid, k_grid, prefix, axes if has_rel else [], dtype, d=8)
    q.requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        assert dispatch.select("attention", q, fused_attn=fused, rel_pos=has_rel, video=len(q_grid) == 3) == expected
    calls = []
    for name in ("cpu_flash_attention", "augmented_attention", "masked_attention_in_row_blocks", "explicit_attention"):
        fn = getattr(ops_attention, name)
        monkeypatch.setattr(ops_attention, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    with torch.set_grad_enabled(grad):
        out = attention(q, k, v, SCALE, q_grid, k_grid, rel, prefix, fused)
    names = {"cpu_flash": ["cpu_flash_attention"], "sdpa_augmented": ["augmented_attention"],
             "sdpa_mask_rows": ["masked_attention_in_row_blocks"], "explicit": ["explicit_attention"], "sdpa": []}
    assert calls == names[expected]
    bias = rel_pos_bias(q, q_grid, k_grid, rel, prefix) if has_rel else None
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, explicit_attention(q, k, v, SCALE, bias), rtol=tol, atol=tol)


def test_compiled_graphs_take_the_mask_path() -> None:
    q = torch.randn(1, 1, 4, 8)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q: dispatch.select("attention", q), fullgraph=False, backend="eager")
    assert compiled(q.requires_grad_(True)) == "sdpa_mask"
    assert dispatch.select("attention", q) == "cpu_flash"
    with torch.no_grad():
        assert dispatch.select("attention", q) == "sdpa_mask_rows"
        assert dispatch.select("attention", q.bfloat16()) == "sdpa_augmented"


def test_without_the_cpu_flash_ops_training_takes_autograd_through_sdpa(monkeypatch) -> None:
    monkeypatch.setattr(dispatch, "HAS_CPU_FLASH", False)
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    assert dispatch.select("attention", q) == "sdpa_augmented"


# -- CUDA: the same paths, and a fused kernel, not the math fallback -----------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("q_grid,k_grid,prefix,axes", CASES, ids=IDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2), (torch.float16, 2e-2)],
                         ids=["fp32", "bf16", "fp16"])
def test_cuda_fused_kernel_equals_the_explicit_path(q_grid, k_grid, prefix, axes, dtype, tol) -> None:
    """`attention` on CUDA (sdpa_augmented) under sdpa_kernel with the math backend excluded (it raises if no
    fused kernel applies): values and gradients equal the explicit path computed in float32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, rel = _inputs(q_grid, k_grid, prefix, axes, torch.float32, heads=2, d=64, device="cuda")
    tensors = [q, k, v] + [r for r in rel if r is not None]
    assert dispatch.select("attention", q.requires_grad_(True)) == "sdpa_augmented"

    def ours(q, k, v, *tables):
        it = iter(tables)
        rel_ = [next(it).to(dtype) if r is not None else None for r in rel]
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            return attention(q.to(dtype), k.to(dtype), v.to(dtype), SCALE, q_grid, k_grid, rel_, prefix)

    ref = _with_tables(lambda q, k, v, rel: _reference(q, k, v, q_grid, k_grid, rel, prefix), rel)
    out, grads = _grads(ours, tensors)
    ref_out, ref_grads = _grads(ref, tensors)
    assert out.dtype == dtype
    scale = lambda t: t.float().abs().max().item()  # noqa: E731
    assert (out.float() - ref_out).abs().max().item() <= tol * scale(ref_out)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert (a.float() - b).abs().max().item() <= tol * scale(b), i


@pytest.mark.parametrize("q_grid,k_grid,prefix,axes", CASES, ids=IDS)
@pytest.mark.parametrize("backward", ["gemm", "kernel"])
def test_bf16_cpu_flash_backward_either_way_equals_the_explicit_path(q_grid, k_grid, prefix, axes, backward,
                                                                      monkeypatch) -> None:
    """bf16 training: small attentions take the GEMM backward, larger ones the kernel's; both against the
    explicit path on the same bf16 inputs, and each taken where the dispatch says."""
    if backward == "kernel":
        monkeypatch.setattr(dispatch, "GEMM_BACKWARD_MAX_PAIRS", 0)
    calls = []
    gemm = ops_attention._gemm_backward
    monkeypatch.setattr(ops_attention, "_gemm_backward", lambda *a: calls.append(1) or gemm(*a))
    q, k, v, rel = _inputs(q_grid, k_grid, prefix, axes, torch.bfloat16, d=8)
    tensors = [t.requires_grad_(True) for t in [q, k, v] + [r for r in rel if r is not None]]
    ours = _with_tables(lambda q, k, v, rel: cpu_flash_attention(q, k, v, SCALE, q_grid, k_grid, rel, prefix), rel)
    ref = _with_tables(lambda q, k, v, rel: _reference(q, k, v, q_grid, k_grid, rel, prefix), rel)
    _, grads = _grads(ours, tensors)
    assert calls == ([1] if backward == "gemm" else [])
    _, ref_grads = _grads(ref, tensors)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert (a.float() - b.float()).abs().max().item() <= 6e-2 * b.float().abs().max().item(), i
