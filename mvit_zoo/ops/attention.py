"""Attention with MViTv2's decomposed relative-position bias (Li et al. 2022, eq. 4).

`attention` is the one entry point; `dispatch.select` says which implementation runs. `rel_pos_terms`
is eq. 4, the reference every fast path is tested against; `augment_qk` folds its terms into q . k
(per-axis terms appended to q, one-hot key coordinates to k), so SDPA runs with no mask at all.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import memory
from .dispatch import select
from .memory import autocast_off, lowered

__all__ = ["attention", "rel_pos_terms", "rel_pos_bias", "augment_qk", "explicit_attention", "augmented_attention",
           "masked_attention_in_row_blocks", "cpu_flash_attention"]


def _letters(nd: int) -> str:
    return "thw"[3 - nd:]


def rel_pos_terms(q: Tensor, q_grid: List[int], rel: List[Optional[Tensor]], num_prefix: int) -> List[Optional[Tensor]]:
    """MViTv2 eq. 4, per grid axis a: T_a[i, j_a] = q_i . R_a[i_a, j_a], for the grid queries i.

    q: (B, h, P + Nq, d) on `q_grid`; rel[a]: R_a (q_a, k_a, d), the looked-up embeddings, or None.
    Returns T_a (B, h, Nq, k_a) per axis (None where rel[a] is). The bias of query i and key j is
    sum_a T_a[i, j_a]; prefix (class-token) rows and columns get none.
    """
    B, H, d = q.shape[0], q.shape[1], q.shape[3]
    letters = _letters(len(q_grid))
    r_q = q[:, :, num_prefix:].reshape([B, H] + q_grid + [d])  # (B, h, *q_grid, d), e.g. (B, h, T, H, W, d)
    terms: List[Optional[Tensor]] = []
    for axis, r in enumerate(rel):
        if r is None:
            terms.append(None)
        else:
            # (B, h, *q_grid, d) . (q_a, k_a, d) over d -> (B, h, *q_grid, k_a), e.g. "bnthwc,hkc->bnthwk"
            term = torch.einsum("bn" + letters + "c," + letters[axis] + "kc->bn" + letters + "k", r_q, r)
            terms.append(term.reshape(B, H, -1, r.shape[1]))
    return terms


def _on_key_grid(terms: List[Optional[Tensor]], k_grid: List[int]) -> List[Tensor]:
    """T_a (B, h, Nq, k_a) -> (B, h, Nq, 1.., k_a, ..1), broadcasting over the other key axes; Nones dropped."""
    out: List[Tensor] = []
    for axis, term in enumerate(terms):
        if term is not None:
            out.append(term.reshape(list(term.shape[:3]) + [k_grid[a] if a == axis else 1 for a in range(len(k_grid))]))
    return out


def rel_pos_bias(q: Tensor, q_grid: List[int], k_grid: List[int], rel: List[Optional[Tensor]],
                 num_prefix: int) -> Tensor:
    """The bias (B, h, P + Nq, P + Nk) of eq. 4: sum over axes of `rel_pos_terms`, 0 for prefix rows/columns."""
    terms = _on_key_grid(rel_pos_terms(q, q_grid, rel, num_prefix), k_grid)
    assert len(terms) > 0, "rel_pos_bias needs a table for at least one axis"
    bias = terms[0]
    for term in terms[1:]:
        bias = bias + term  # (B, h, Nq, *k_grid) once every axis is in
    B, H, n_q = bias.shape[0], bias.shape[1], bias.shape[2]
    bias = bias.expand([B, H, n_q] + k_grid).reshape(B, H, n_q, -1)
    return F.pad(bias, [num_prefix, 0, num_prefix, 0]) if num_prefix else bias


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Optional[Tensor]) -> Tensor:
    """softmax(q k^T * scale + bias) v, (B, h, L, d) -> (B, h, L, d): the reference."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    return attn.softmax(dim=-1) @ v


def _key_coordinates(k_grid: List[int], axes: List[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """One-hot key coordinates (Nk, sum of k_grid[a] for a in axes): key j (row-major on `k_grid`) has a 1
    in the column of its coordinate j_a along each listed axis."""
    coords = torch.stack(torch.meshgrid([torch.arange(g, device=device) for g in k_grid], indexing="ij"), dim=-1)
    coords = coords.reshape(-1, len(k_grid))  # (Nk, nd): j_a of each key
    return torch.cat([F.one_hot(coords[:, a], k_grid[a]) for a in axes], dim=1).to(dtype)


def augment_qk(q: Tensor, k: Tensor, scale: float, q_grid: List[int], k_grid: List[int],
               rel: List[Optional[Tensor]], num_prefix: int) -> Tuple[Tensor, Tensor]:
    """q, k (B, h, P + N, d) -> q', k' (B, h, P + N, W) with q' . k' * scale = q . k * scale + rel_pos_bias.

    q' = [q, T_a / scale for each axis a, 0...], k' = [k, one-hot j_a for each axis a, 0...]: the
    bias of eq. 4 becomes part of the QK product. Prefix rows get zeros (no bias for the class token).
    W = d + sum_a k_a rounded up to 32 for 16-bit (CPU kernels run best there), 8 on CUDA (kernels'
    alignment).
    """
    B, H, d, p = q.shape[0], q.shape[1], q.shape[3], num_prefix
    axes = [a for a in range(len(rel)) if rel[a] is not None]
    scaled: List[Optional[Tensor]] = [None if r is None else r * (1.0 / scale) for r in rel]
    extra_q = torch.cat([t for t in rel_pos_terms(q, q_grid, scaled, p) if t is not None], dim=-1).to(q.dtype)
    align = 32 if q.element_size() < 4 else (8 if q.is_cuda else 1)
    pad = -(d + extra_q.shape[-1]) % align
    keys = _key_coordinates(k_grid, axes, k.dtype, k.device)
    if pad or p:  # zero columns up to the alignment, zero rows for the prefix tokens: (P + Nk, W - d) keys
        extra_q, keys = F.pad(extra_q, [0, pad, p, 0]), F.pad(keys, [0, pad, p, 0])
    q_aug = torch.cat([q, extra_q], dim=-1)
    k_aug = torch.cat([k, keys.expand(B, H, -1, -1)], dim=-1)
    return q_aug, k_aug


def _pad_to(x: Tensor, width: int) -> Tensor:
    """x (..., d) with zero channels up to `width` (the kernels want one head size for q, k and v)."""
    return torch.cat([x, x.new_zeros(x.shape[:-1] + (width - x.shape[-1],))], dim=-1)


def _gemm_backward(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float) -> List[Tensor]:
    """The gradients of softmax(q k^T * scale) v as batched GEMMs: d_q, d_k (B, h, L, W), d_v (B, h, Nk, d).
    The logits are recomputed in float32 (products of 16-bit numbers are exact there) and the softmax
    from them, so P and Delta = rowsum(P * dP) agree; P, dP and dS go through the GEMMs in q's dtype."""
    B, H, n_q, W = q.shape
    n_k = k.shape[2]
    q2, k2 = q.reshape(B * H, n_q, W), k.reshape(B * H, n_k, W)
    probs = torch.bmm(q2.float(), k2.float().transpose(1, 2)).mul_(scale).softmax(-1)  # P (B h, Nq, Nk)
    d_out2, v2 = d_out.reshape(B * H, n_q, -1), v.reshape(B * H, n_k, -1)
    d_v = torch.bmm(probs.to(v.dtype).transpose(1, 2), d_out2)  # P^T dO (B h, Nk, d)
    d_s = torch.bmm(d_out2, v2.transpose(1, 2)).float()  # dP = dO V^T, then in place dS = P (dP - Delta) scale
    delta = (d_s * probs).sum(-1, keepdim=True)
    d_s = d_s.sub_(delta).mul_(probs).mul_(scale).to(q.dtype)
    d_q = torch.bmm(d_s, k2)  # dS K (B h, Nq, W)
    d_k = torch.bmm(d_s.transpose(1, 2), q2)  # dS^T Q (B h, Nk, W)
    return [d_q.view(B, H, n_q, W), d_k.view(B, H, n_k, W), d_v.view(B, H, n_k, -1)]


class _CpuFlashRelPos(torch.autograd.Function):
    """SDPA's CPU flash kernels, forward and backward, on `augment_qk`'s q', k' and zero-padded v. Keeps
    q, k, v, the output and the row log-sum-exp; the kernel's gradient of q' holds, in its extra
    channels, dL/dT_a * (1 / scale), which the chain rule takes into q and the embeddings R_a."""

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
        if select("attention_backward", q, pairs=q.shape[2] * k.shape[2]) == "gemm":
            d_q_aug, d_k, d_v = _gemm_backward(d_out, q_aug, k_aug, v, scale)
        else:
            d_q_aug, d_k, d_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _pad_to(d_out, width), q_aug, k_aug, _pad_to(v, width), out, lse, 0.0, False, scale=scale)
        del q_aug, k_aug
        d_q = d_q_aug[..., :d]
        letters = _letters(len(q_grid))
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
            # dL/dT_a (B, h, *q_grid, k_a) . R_a (q_a, k_a, d) -> dL/dq (B, h, *q_grid, d)
            d_q[:, :, p:] += torch.einsum(f"bn{letters}k,{letters[axis]}kc->bn{letters}c", d_term, r).reshape(
                B, H, -1, d)
            # dL/dT_a (B, h, *q_grid, k_a) . q (B, h, *q_grid, d) -> dL/dR_a (q_a, k_a, d)
            d_rel.append(torch.einsum(f"bn{letters}k,bn{letters}c->{letters[axis]}kc", d_term, r_q))
        return (d_q, d_k[..., :d], d_v[..., :d], None, None, None, None, *d_rel)


def augmented_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, q_grid: List[int], k_grid: List[int],
                        rel: List[Optional[Tensor]], num_prefix: int) -> Tensor:
    """sdpa_augmented: SDPA on `augment_qk`'s q', k' and zero-padded v, no mask; autograd through it."""
    q_aug, k_aug = augment_qk(q, k, scale, q_grid, k_grid, rel, num_prefix)
    return F.scaled_dot_product_attention(q_aug, k_aug, _pad_to(v, q_aug.shape[-1]), scale=scale)[..., :q.shape[-1]]


def masked_attention_in_row_blocks(q: Tensor, k: Tensor, v: Tensor, scale: float, q_grid: List[int],
                                   k_grid: List[int], rel: List[Optional[Tensor]], num_prefix: int) -> Tensor:
    """sdpa_mask_rows: SDPA with the `rel_pos_bias` mask, `memory.ROW_BLOCK_BYTES` of it at a time in one
    reused buffer, never the whole (P + Nq, P + Nk) mask; prefix queries (no bias) without a mask.
    (B, h, P + Nq, d) -> the same, laid out (B, P + Nq, h, d) as SDPA's output is."""
    B, H, L, _ = q.shape
    p, n_k = num_prefix, k.shape[2]
    terms = _on_key_grid(rel_pos_terms(q, q_grid, rel, p), k_grid)
    step = max(1, memory.ROW_BLOCK_BYTES // (B * H * n_k * q.element_size()))
    mask = q.new_zeros(B, H, min(step, L - p), n_k)  # its P prefix columns stay 0
    out = q.new_empty(B, L, H, v.shape[3]).transpose(1, 2)
    if p:
        out[:, :, :p] = F.scaled_dot_product_attention(q[:, :, :p], k, v, scale=scale)
    for start in range(p, L, step):
        stop = min(L, start + step)
        block = mask[:, :, :stop - start]
        rows = [t[:, :, start - p:stop - p] for t in terms]
        partial = rows[0]
        for t in rows[1:-1]:
            partial = partial + t
        bias = block[..., p:].view([B, H, stop - start] + k_grid)  # (B, h, rows, *k_grid)
        if len(rows) > 1:
            torch.add(partial, rows[-1], out=bias)
        else:
            bias.copy_(partial)
        out[:, :, start:stop] = F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=block, scale=scale)
    return out


def cpu_flash_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, q_grid: List[int], k_grid: List[int],
                        rel: List[Optional[Tensor]], num_prefix: int) -> Tensor:
    """cpu_flash: `_CpuFlashRelPos`, under autocast on q, k, v and R in the autocast dtype as SDPA's would be."""
    device = q.device.type
    q, k, v, *rel = lowered(device, [q, k, v] + list(rel))
    with torch.autocast(device, enabled=False):
        return _CpuFlashRelPos.apply(q, k, v, scale, list(q_grid), list(k_grid), num_prefix, *rel)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, q_grid: List[int], k_grid: List[int],
              rel: List[Optional[Tensor]], num_prefix: int, fused: bool = True) -> Tensor:
    """softmax(q k^T * scale + rel_pos_bias) v: q (B, h, P + Nq, d) on `q_grid`, k and v (B, h, P + Nk, d)
    on `k_grid` -> (B, h, P + Nq, d). `rel` holds R_a (q_a, k_a, d) per grid axis or None (no bias on it).
    The implementation is `dispatch.select`'s ("attention"); TorchScript runs sdpa_mask or explicit."""
    has_rel = False
    for r in rel:
        has_rel = has_rel or r is not None
    if not torch.jit.is_scripting():
        path = select("attention", q, fused_attn=fused, rel_pos=has_rel, video=len(q_grid) == 3)
        if path == "cpu_flash":
            return cpu_flash_attention(q, k, v, scale, q_grid, k_grid, rel, num_prefix)
        if path == "sdpa_augmented":
            return augmented_attention(q, k, v, scale, q_grid, k_grid, rel, num_prefix)
        if path == "sdpa_mask_rows":
            return masked_attention_in_row_blocks(q, k, v, scale, q_grid, k_grid, rel, num_prefix)
    bias = rel_pos_bias(q, q_grid, k_grid, rel, num_prefix).to(q.dtype) if has_rel else None
    if not fused:
        return explicit_attention(q, k, v, scale, bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
