"""Attention with the decomposed relative-position bias of MViTv2 (Li et al. 2022, eq. 4).

`rel_pos_bias` builds the additive bias for `F.scaled_dot_product_attention` (inference, CUDA).
`augment_qk` folds the bias into q . k instead: per-axis terms appended to q, one-hot key coordinates
to k. `augmented_attention` (CPU inference, where it pays) runs SDPA on them without any mask.
`rel_pos_attention` is the CPU training path: SDPA on CPU cannot give a gradient for an additive
mask, so with a bias that needs one it falls back to its math path, which keeps the probabilities
and the bias (B, heads, Nq, Nk), and float32 copies of q, k, v under bf16 autocast, for the backward.
`rel_pos_attention` runs SDPA's fused CPU kernels, forward and backward, on the augmented q and k:
it keeps q, k, v, the output and the row log-sum-exp, and the bias gradient comes out of the
kernel's gradient of q' (bf16 attentions up to EXPLICIT_BACKWARD_MAX query-key pairs: the same
backward as batched GEMMs, faster there). `attention_in_row_blocks` is CPU inference with the mask
for the masks too large to allocate whole (fused.FRESH_PAGES_BYTES).
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .memory import BLOCK_BYTES, autocast_off, compute_dtype, lowered, splitting_pays, tracing

__all__ = ["rel_pos_bias", "rel_pos_attention", "augment_qk", "augmented_attention", "augmenting_pays",
           "attention_in_row_blocks", "mask_in_row_blocks_pays"]


def _axes(nd: int) -> str:
    return "thw"[3 - nd:]


def _axis_terms(q: Tensor, q_grid: List[int], rel: List[Optional[Tensor]], num_prefix: int,
                factor: float) -> List[Optional[Tensor]]:
    """Per grid axis a, the bias term T_a = factor * q . R_a[q_a, k_a] (B, heads, *q_grid, k_a) of the
    grid queries, or None where the axis has no table."""
    B, H, d = q.shape[0], q.shape[1], q.shape[3]
    letters = _axes(len(q_grid))
    r_q = q[:, :, num_prefix:].reshape([B, H] + q_grid + [d])
    terms: List[Optional[Tensor]] = []
    for axis, r in enumerate(rel):
        if r is None:
            terms.append(None)
        else:
            if factor != 1.0:
                r = (r * factor).to(q.dtype)
            terms.append(torch.einsum("bn" + letters + "c," + letters[axis] + "kc->bn" + letters + "k", r_q, r))
    return terms


def _bias_terms(q: Tensor, q_grid: List[int], k_grid: List[int], rel: List[Optional[Tensor]], num_prefix: int) -> List[Tensor]:
    """The per-axis bias terms of the grid queries, each (B, heads, Nq, *k_grid with 1 on the other axes):
    they broadcast to the bias (B, heads, Nq, *k_grid)."""
    B, H = q.shape[0], q.shape[1]
    nd = len(q_grid)
    n_q = 1
    for g in q_grid:
        n_q *= g
    terms: List[Tensor] = []
    for axis, term in enumerate(_axis_terms(q, q_grid, rel, num_prefix, 1.0)):
        if term is not None:
            shape = [B, H, n_q]
            for a in range(nd):
                shape.append(k_grid[a] if a == axis else 1)
            terms.append(term.reshape(shape))
    assert len(terms) > 0, "rel_pos_bias needs a table for at least one axis"
    return terms


def _sum_terms(terms: List[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """The sum of `_bias_terms` (B, heads, Nq, *k_grid), written into `out` when given. All but the last
    term add up at a fraction of the full size."""
    partial = terms[0]
    for term in terms[1:-1]:
        partial = partial + term
    if out is None:
        return partial + terms[-1] if len(terms) > 1 else partial
    if len(terms) > 1:
        return torch.add(partial, terms[-1], out=out)
    return out.copy_(partial.expand(out.shape))


def _write_bias(terms: List[Tensor], out: Tensor, start: int, num_prefix: int, k_grid: List[int]) -> None:
    """Rows start .. start + out.shape[2] of the bias (B, heads, P + Nq, P + Nk) written into `out`: 0 in the
    P prefix rows and columns, the sum of `_bias_terms` elsewhere."""
    B, H, p = out.shape[0], out.shape[1], num_prefix
    stop = start + out.shape[2]
    first = max(start, p)  # the first grid query; the rows before it are prefix queries
    out[:, :, :first - start].zero_()
    out[:, :, first - start:, :p].zero_()
    _sum_terms([t[:, :, first - p:stop - p] for t in terms], out[:, :, first - start:, p:].view([B, H, stop - first] + k_grid))


def rel_pos_bias(q: Tensor, q_grid: List[int], k_grid: List[int], rel: List[Optional[Tensor]], num_prefix: int) -> Tensor:
    """Decomposed relative-position bias (B, heads, P + Nq, P + Nk) for the attention logits.

    q: (B, heads, P + Nq, d) on `q_grid`. `rel` has, per grid axis a, the looked-up embeddings
    R_a (q_a, k_a, d) or None. The bias of a query/key pair is the sum over axes of q . R_a[q_a, k_a];
    the P prefix rows and columns are 0.
    """
    B, H = q.shape[0], q.shape[1]
    terms = _bias_terms(q, q_grid, k_grid, rel, num_prefix)
    n_q = terms[0].shape[2]
    p = num_prefix
    if p > 0 and not torch.is_grad_enabled() and not torch.jit.is_scripting() and not tracing():
        # one write into the padded bias instead of a full-size sum then a full-size padded copy
        n_k = 1
        for g in k_grid:
            n_k *= g
        bias = q.new_empty([B, H, p + n_q, p + n_k], dtype=terms[0].dtype)
        _write_bias(terms, bias, 0, p, k_grid)
        return bias
    bias = _sum_terms(terms).expand([B, H, n_q] + k_grid).reshape(B, H, n_q, -1)
    if p > 0:
        bias = F.pad(bias, [p, 0, p, 0])
    return bias


@torch.jit.unused
def mask_in_row_blocks_pays(q: Tensor, k: Tensor) -> bool:
    """Whether `attention_in_row_blocks` should run instead of SDPA on the whole mask (q, k: (B, heads,
    L, d)): CPU inference, when the mask would come in fresh pages (fused.FRESH_PAGES_BYTES)."""
    return splitting_pays(q, q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])


@torch.jit.unused
def attention_in_row_blocks(q: Tensor, k: Tensor, v: Tensor, scale: float, q_grid: List[int], k_grid: List[int],
                            rel: List[Optional[Tensor]], num_prefix: int, block_bytes: int = 0) -> Tensor:
    """SDPA with the `rel_pos_bias` mask without autograd, a block of query rows at a time: the mask is
    built `block_bytes` (default fused.BLOCK_BYTES) at a time in one buffer, never whole.
    (B, heads, P + Nq, d) -> same shape, laid out (B, P + Nq, heads, d) as SDPA's output is. Same values
    as SDPA on the whole mask."""
    B, H, L, d = q.shape
    p = num_prefix
    terms = _bias_terms(q, q_grid, k_grid, rel, p)
    n_k = k.shape[2]
    step = max(1, (block_bytes or BLOCK_BYTES) // (B * H * n_k * q.element_size()))
    out = q.new_empty(B, L, H, v.shape[3]).transpose(1, 2)
    mask = q.new_empty(B, H, min(step, L), n_k)
    for start in range(0, L, step):
        stop = min(L, start + step)
        block = mask[:, :, :stop - start]
        _write_bias(terms, block, start, p, k_grid)
        out[:, :, start:stop] = F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=block, scale=scale)
    return out


def _key_positions(k_grid: List[int], axes: List[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """One-hot key coordinates (N_k, sum of k_grid[a] for a in axes): key j has a 1 in the column of its
    coordinate along each listed axis."""
    n_k = 1
    for g in k_grid:
        n_k *= g
    width = 0
    for a in axes:
        width += k_grid[a]
    index = torch.arange(n_k, device=device)
    onehot = torch.zeros(n_k, width, device=device, dtype=dtype)
    offset, step = 0, n_k
    for a in range(len(k_grid)):
        step //= k_grid[a]  # key j's coordinate on axis a is j // step % k_grid[a] (row-major grid)
        if a in axes:
            onehot[index, index // step % k_grid[a] + offset] = 1.0
            offset += k_grid[a]
    return onehot


def augment_qk(q: Tensor, k: Tensor, scale: float, q_grid: List[int], k_grid: List[int],
               rel: List[Optional[Tensor]], num_prefix: int) -> List[Tensor]:
    """q, k (B, heads, P + N, d) -> q', k' (B, heads, P + N, d + S + pad) with
    q' . k' * scale = q . k * scale + rel_pos_bias(q, ...).

    The decomposed bias of query i and key j is sum_a q_i . R_a[i_a, j_a] = sum_a T_a[i, j_a] (MViTv2
    eq. 4), the dot product of the per-axis terms T_a[i, :] / scale, appended to q (after its d
    channels, axis by axis), with the one-hot coordinates of key j, appended to k (S = sum of the
    key grid sizes): the bias becomes part of the QK GEMM, no (Nq, Nk) mask needed. Prefix rows
    get zeros: no bias for the class token.
    """
    B, H, d = q.shape[0], q.shape[1], q.shape[3]
    p = num_prefix
    axes = [a for a in range(len(q_grid)) if rel[a] is not None]
    extra = 0
    for a in axes:
        extra += k_grid[a]
    width = d + extra
    if q.element_size() < 4:  # 16-bit kernels run best on head sizes in multiples of 32 (measured, CPU)
        width += -width % 32
    q_aug = q.new_zeros([B, H, q.shape[2], width])
    q_aug[..., :d] = q
    offset = d
    for a, term in enumerate(_axis_terms(q, q_grid, rel, p, 1.0 / scale)):
        if term is not None:
            q_aug[:, :, p:, offset:offset + k_grid[a]] = term.reshape(B, H, -1, k_grid[a])
            offset += k_grid[a]
    k_aug = k.new_zeros([B, H, k.shape[2], width])
    k_aug[..., :d] = k
    k_aug[:, :, p:, d:d + extra] = _key_positions(k_grid, axes, k.device, k.dtype)
    return [q_aug, k_aug]


def _pad_to(v: Tensor, width: int) -> Tensor:
    """v (..., d) with zero channels up to `width`: SDPA's CPU kernel wants one head size for q, k, v."""
    return F.pad(v, [0, width - v.shape[-1]])


@torch.jit.unused
def augmenting_pays(q: Tensor, nd: int) -> bool:
    """Whether eager CPU inference should use `augmented_attention` rather than the mask: measured
    faster in bf16/fp16 (the broadcast adds that build a 16-bit mask are slow) and for video (three
    terms, short rows), not for 2D float32, whose mask costs less than the longer heads."""
    if q.device.type != "cpu" or tracing():
        return False
    return nd == 3 or compute_dtype(q) != torch.float32


@torch.jit.unused
def augmented_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, q_grid: List[int], k_grid: List[int],
                        rel: List[Optional[Tensor]], num_prefix: int) -> Tensor:
    """softmax(q k^T * scale + rel_pos_bias) v, (B, heads, P + Nq, d) -> same shape (a view: the last
    axis is strided), by SDPA on `augment_qk`'s tensors: no mask is built, read or kept."""
    q_aug, k_aug = augment_qk(q, k, scale, q_grid, k_grid, rel, num_prefix)
    return F.scaled_dot_product_attention(q_aug, k_aug, _pad_to(v, q_aug.shape[-1]), scale=scale)[..., :q.shape[-1]]


# bf16 CPU training: attentions with at most this many query-key pairs (per image and head) take
# `_explicit_backward`, 1.5-4x faster than the fused kernel's there (measured with mvit_tiny/small's
# shapes: 196 x 196, 49 x 196, 49 x 49) and as accurate; the kernel is faster on larger ones. Not
# fp16: its dS, whose entries are small, would lose digits in the GEMMs' 16-bit inputs.
EXPLICIT_BACKWARD_MAX = 64 * 1024


def _explicit_backward(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float) -> List[Tensor]:
    """The gradients of softmax(q k^T * scale) v as batched GEMMs: d_q, d_k (B, heads, L, W), d_v
    (B, heads, Nk, d), in q's dtype. The logits are recomputed in float32 from q and k (products of
    16-bit numbers are exact there) and the softmax from them, so the probabilities and
    Delta = rowsum(P * dP) agree with each other; P, dP and dS go through the GEMMs in q's dtype.
    Measured against float64: as accurate as the kernel's backward (tests/test_attention.py)."""
    B, H, n_q, W = q.shape
    n_k = k.shape[2]
    q2, k2 = q.reshape(B * H, n_q, W), k.reshape(B * H, n_k, W)
    probs = torch.bmm(q2.float(), k2.float().transpose(1, 2)).mul_(scale).softmax(-1)
    d_out2, v2 = d_out.reshape(B * H, n_q, -1), v.reshape(B * H, n_k, -1)
    d_v = torch.bmm(probs.to(v.dtype).transpose(1, 2), d_out2)
    d_s = torch.bmm(d_out2, v2.transpose(1, 2)).float()  # dP, then in place dS = P * (dP - Delta) * scale
    delta = (d_s * probs).sum(-1, keepdim=True)
    d_s = d_s.sub_(delta).mul_(probs).mul_(scale).to(q.dtype)
    d_q = torch.bmm(d_s, k2)
    d_k = torch.bmm(d_s.transpose(1, 2), q2)
    return [d_q.view(B, H, n_q, W), d_k.view(B, H, n_k, W), d_v.view(B, H, n_k, -1)]


class _RelPosAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias(q, R)) v as SDPA's fused CPU kernels, forward and backward, on
    `augment_qk`'s q', k' (and v zero-padded): no (Nq, Nk) tensor is built, or kept for the backward.
    The kernel's gradient of q' holds, in its extra channels, the bias terms' gradients (dS summed
    per key axis) times the scale, which the chain rule takes into q and the embeddings."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, q_grid: List[int], k_grid: List[int],
                num_prefix: int, *rel: Optional[Tensor]) -> Tensor:
        q_aug, k_aug = augment_qk(q, k, scale, q_grid, k_grid, list(rel), num_prefix)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_aug, k_aug, _pad_to(v, q_aug.shape[-1]), 0.0, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, *rel)
        ctx.meta = (scale, q_grid, k_grid, num_prefix)
        return out[..., :q.shape[-1]]

    @staticmethod
    @autocast_off
    def backward(ctx, d_out: Tensor):
        q, k, v, out, lse, *rel = ctx.saved_tensors
        scale, q_grid, k_grid, p = ctx.meta
        B, H, d = q.shape[0], q.shape[1], q.shape[3]
        q_aug, k_aug = augment_qk(q, k, scale, q_grid, k_grid, rel, p)
        width = q_aug.shape[-1]
        if q.dtype == torch.bfloat16 and q.shape[2] * k.shape[2] <= EXPLICIT_BACKWARD_MAX:
            d_q_aug, d_k, d_v = _explicit_backward(d_out, q_aug, k_aug, v, scale)
        else:
            d_q_aug, d_k, d_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _pad_to(d_out, width), q_aug, k_aug, _pad_to(v, width), out, lse, 0.0, False, scale=scale)
        del q_aug, k_aug
        d_q = d_q_aug[..., :d]
        # q' carries T_a / scale for T_a = r_q . R_a, the bias term of axis a: dL/dT_a into q and R_a
        letters = _axes(len(q_grid))
        r_q = q[:, :, p:].reshape([B, H] + q_grid + [d])
        d_rel: List[Optional[Tensor]] = []
        offset = d
        for axis, r in enumerate(rel):
            if r is None:
                d_rel.append(None)
                continue
            size = k_grid[axis]
            d_term = (d_q_aug[:, :, p:, offset:offset + size] * (1.0 / scale)).reshape([B, H] + q_grid + [size])
            offset += size
            d_q[:, :, p:] += torch.einsum(f"bn{letters}k,{letters[axis]}kc->bn{letters}c", d_term, r).reshape(B, H, -1, d)
            d_rel.append(torch.einsum(f"bn{letters}k,bn{letters}c->{letters[axis]}kc", d_term, r_q))
        return (d_q, d_k[..., :d], d_v[..., :d], None, None, None, None, *d_rel)


@torch.jit.unused
def rel_pos_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, q_grid: List[int], k_grid: List[int],
                      rel: List[Optional[Tensor]], num_prefix: int) -> Tensor:
    """softmax(q k^T * scale + rel_pos_bias) v for CPU training: (B, heads, P + Nq, d) -> same shape.

    Same values and gradients as `F.scaled_dot_product_attention(q, k, v, rel_pos_bias(...))`; under
    autocast q, k, v run in the autocast dtype as SDPA's would.
    """
    device = q.device.type
    q, k, v, *rel = lowered(device, [q, k, v] + list(rel))
    with torch.autocast(device, enabled=False):
        return _RelPosAttention.apply(q, k, v, scale, list(q_grid), list(k_grid), num_prefix, *rel)
