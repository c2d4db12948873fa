"""Autograd functions that make training cheaper than the plain modules, with the same values and gradients.

- `norm_mlp`: LayerNorm -> fc1 -> GELU -> fc2 as one function. The MLP branch of a transformer block is
  where most training memory goes: autograd keeps the LayerNorm output (for fc1's weight gradient), the
  fc1 output (for GELU) and the GELU output (for fc2's weight gradient), 1 + 4 + 4 times the block's
  activation size at MLP ratio 4. `norm_mlp` (`norm_linears` for fc1, then GELU + fc2 as one function)
  keeps only the fc1 output and recomputes the other two in backward: one LayerNorm and one GELU,
  elementwise, against the block's six GEMMs.
- `norm_linears`: LayerNorm then several linears (the block's q, k, v and shortcut projections) keeping
  the LayerNorm input only.
- `depthwise_conv`: the pooling conv with its backward in float32 when the forward runs in bf16/fp16.
- `residual_linear`: the attention's residual pooling (out + q) and output projection, keeping out and
  q, which the attention keeps anyway, instead of their sum.
- `max_pool`: max pooling that keeps no int64 indices (recomputed in backward from the kept input, which
  the residual stream keeps anyway): 4x the size of a bf16 activation, 2x a float32 one.
- `mlp_in_row_blocks`: inference only. fc1 -> GELU -> fc2 a block of rows at a time through one hidden
  buffer, for the MLPs whose hidden tensor would be larger than `FRESH_PAGES_BYTES` (`splitting_pays`).

The model uses them only when autograd records an eager forward; scripted, compiled and exported graphs
keep the plain ops (their compilers decide what to keep).
"""
import functools
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["norm_mlp", "norm_linears", "depthwise_conv", "max_pool", "residual_linear", "add_residual", "compute_dtype",
           "tracing", "lowered", "autocast_off", "mlp_in_row_blocks", "splitting_pays", "FRESH_PAGES_BYTES", "BLOCK_BYTES"]

# glibc's malloc (the CPU allocator under PyTorch on Linux) serves every block larger than 32 MiB, its
# largest mmap threshold on 64-bit, with fresh pages from the kernel: the first write into such a tensor
# takes a page fault per 4 KiB, about as long as the GEMM that fills it (measured: mvit_tiny's stage-1
# fc1 output at batch 8, 38.5 MB, 17 ms into fresh pages, 6 ms into a buffer that exists). Smaller
# blocks come back from the heap. CPU inference computes the few tensors above this size (the first
# stage's MLP hidden tensor, the largest attention masks) a block of rows at a time, through one
# buffer of BLOCK_BYTES, which also stays in cache between the ops that fill and read it.
FRESH_PAGES_BYTES = 32 << 20
BLOCK_BYTES = 8 << 20


@torch.jit.unused
def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype ops on `x` run in: autocast's where it is on (for the ops it lowers), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


@torch.jit.unused
def tracing() -> bool:
    """Whether torch.compile, torch.export or torch.jit.trace is tracing this call."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


@torch.jit.unused
def splitting_pays(x: Tensor, numel: int) -> bool:
    """Whether an inference op on x should make a tensor of `numel` elements (in x's compute dtype) in
    row blocks: on CPU, without autograd, eager, when it is larger than FRESH_PAGES_BYTES."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or tracing():
        return False
    return numel * torch.finfo(compute_dtype(x)).bits // 8 > FRESH_PAGES_BYTES


def autocast_off(backward: Callable[..., Any]) -> Callable[..., Any]:
    """For the backward of the autograd functions here: run it with autocast off. Autograd runs a
    backward under the autocast state of whoever calls `.backward()`, and inside an autocast region
    that would lower the float32 ops a backward chose (its recomputed logits, float32 GEMMs) to 16 bits."""
    @functools.wraps(backward)
    def run(ctx: Any, *grads: Optional[Tensor]) -> Any:
        device = next((g.device.type for g in grads if g is not None), "cpu")
        with torch.autocast(device, enabled=False):
            return backward(ctx, *grads)
    return run


def lowered(device: str, tensors: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """`tensors` cast to autocast's dtype where autocast is on for `device` (as autocast casts the
    inputs of the ops it lowers); else as they are. For the functions here, which run with autocast off."""
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return [None if t is None else t.to(dtype) for t in tensors]


def _linear_into(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor) -> Tensor:
    """x (N, C_in) @ weight.T (+ bias) written into out (N, C_out)."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


@torch.jit.unused
def mlp_in_row_blocks(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                      fc2_bias: Optional[Tensor], block_bytes: int = 0) -> Tensor:
    """fc2(GELU(fc1(x))) without autograd, (..., C_in) -> (..., C_out): `block_bytes` (default
    BLOCK_BYTES) of the hidden tensor at a time, in one buffer, never the whole (..., hidden) tensor.
    Same values as the plain ops, in autocast's dtype where it is on."""
    device = x.device.type
    x, w1, b1, w2, b2 = lowered(device, [x, fc1_weight, fc1_bias, fc2_weight, fc2_bias])
    assert x is not None and w1 is not None and w2 is not None
    rows_in = x.reshape(-1, x.shape[-1])
    n, hidden = rows_in.shape[0], w1.shape[0]
    step = max(1, (block_bytes or BLOCK_BYTES) // (hidden * x.element_size()))
    out = x.new_empty(n, w2.shape[0])
    buffer = x.new_empty(min(step, n), hidden)
    with torch.autocast(device, enabled=False):
        for start in range(0, n, step):
            stop = min(n, start + step)
            h = _linear_into(rows_in[start:stop], w1, b1, buffer[:stop - start])
            _linear_into(torch.ops.aten.gelu_(h), w2, b2, out[start:stop])
    return out.view(x.shape[:-1] + w2.shape[:1])


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(hidden, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(hidden), weight, bias)

    @staticmethod
    @autocast_off
    def backward(ctx, d_out: Tensor):
        hidden, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_out2 = d_out.reshape(-1, d_out.shape[-1])
        # recompute what was not kept: the GELU output; then reuse its buffer for the input gradient
        # (one fresh hidden-sized buffer instead of three)
        act = F.gelu(hidden)
        d_w = d_out2.t() @ act.reshape(-1, hidden.shape[-1]) if need[1] else None
        d_b = d_out2.sum(0) if need[2] and ctx.has_bias else None
        d_hidden: Optional[Tensor] = None
        if need[0]:
            d_hidden = act
            torch.matmul(d_out, weight, out=d_hidden)
            torch.ops.aten.gelu_backward.grad_input(d_hidden, hidden, grad_input=d_hidden)
        return d_hidden, d_w, d_b


def _layer_norm_to(dtype: torch.dtype, x: Tensor, norm_dtype: torch.dtype, weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """LayerNorm of x over its last axis computed in norm_dtype, output in `dtype`, and its mean and rstd.
    A 16-bit x with a 16-bit output runs the mixed-precision kernel (float32 inside, like
    autocast's float32 LayerNorm then a cast: at most 1 ulp apart) without the two casts, 1.6-6x
    faster on CPU (measured, bf16 stage sizes of mvit_tiny)."""
    if x.dtype == dtype and x.element_size() < 4 and norm_dtype == torch.float32:
        return torch.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)
    out, mean, rstd = torch.native_layer_norm(x.to(norm_dtype), [x.shape[-1]], weight, bias, eps)
    return out.to(dtype), mean, rstd


class _NormLinears(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float,
                norm_dtype: torch.dtype, n: int, *weights_and_biases: Optional[Tensor]) -> Tuple[Tensor, ...]:
        weights, biases = weights_and_biases[:n], weights_and_biases[n:]
        # x is kept in its own dtype (a bf16 stream stays bf16); the norm computes in norm_dtype
        x_norm, mean, rstd = _layer_norm_to(weights[0].dtype, x, norm_dtype, norm_weight, norm_bias, eps)
        outs = tuple(F.linear(x_norm, w, b) for w, b in zip(weights, biases))
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, *weights)
        ctx.eps, ctx.norm_dtype, ctx.n, ctx.has_bias = eps, norm_dtype, n, [b is not None for b in biases]
        return outs

    @staticmethod
    @autocast_off
    def backward(ctx, *d_outs: Optional[Tensor]):
        x_in, mean, rstd, norm_weight, norm_bias, *weights = ctx.saved_tensors
        x_norm = _layer_norm_to(weights[0].dtype, x_in, ctx.norm_dtype, norm_weight, norm_bias, ctx.eps)[0]
        x = x_in.to(ctx.norm_dtype)
        shape, n, need = [x.shape[-1]], ctx.n, ctx.needs_input_grad
        first = 6  # forward's argument index of the first weight
        x_norm2 = x_norm.reshape(-1, shape[0])
        d_weights: List[Optional[Tensor]] = [None] * n
        d_biases: List[Optional[Tensor]] = [None] * n
        d_norm: Optional[Tensor] = None
        for i, (w, d) in enumerate(zip(weights, d_outs)):
            if d is None:
                continue
            d2 = d.reshape(-1, d.shape[-1])
            if need[first + i]:
                d_weights[i] = d2.t() @ x_norm2
            if need[first + n + i] and ctx.has_bias[i]:
                d_biases[i] = d2.sum(0)
            if d_norm is None:
                d_norm = d2 @ w
            else:
                d_norm.addmm_(d2, w)  # in place: no fresh buffer per linear
        if d_norm is None:
            return (None,) * (first + 2 * n)
        mask = [need[0], need[1] and norm_weight is not None, need[2] and norm_bias is not None]
        d_x, d_norm_w, d_norm_b = torch.ops.aten.native_layer_norm_backward(
            d_norm.view(x.shape).to(x.dtype), x, shape, mean, rstd, norm_weight, norm_bias, mask)
        return (None if d_x is None else d_x.to(x_in.dtype), d_norm_w, d_norm_b, None, None, None, *d_weights, *d_biases)


@torch.jit.unused
def norm_linears(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float,
                 weights: List[Tensor], biases: List[Optional[Tensor]]) -> Tuple[Tensor, ...]:
    """linear(layer_norm(x), w_i, b_i) for each i, (..., C) -> (..., C_i) each, keeping x but not the
    LayerNorm output (recomputed in backward). Under autocast the LayerNorm runs in float32 and the
    linears in the autocast dtype, as autocast runs them."""
    device = x.device.type
    norm_dtype = torch.float32 if torch.is_autocast_enabled(device) else x.dtype
    params = lowered(device, list(weights) + list(biases))
    with torch.autocast(device, enabled=False):
        return _NormLinears.apply(x, norm_weight, norm_bias, eps, norm_dtype, len(weights), *params)


@torch.jit.unused
def norm_mlp(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float,
             fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor]) -> Tensor:
    """fc2(gelu(fc1(layer_norm(x)))) for x (..., C) -> (..., C_out), keeping only x and fc1's output.

    Same values and gradients as the plain modules, autocast precisions as in `norm_linears`.
    """
    hidden = norm_linears(x, norm_weight, norm_bias, eps, [fc1_weight], [fc1_bias])[0]
    device = x.device.type
    fc2_weight, fc2_bias = lowered(device, [fc2_weight, fc2_bias])
    with torch.autocast(device, enabled=False):
        return _GeluLinear.apply(hidden, fc2_weight, fc2_bias)


class _DepthwiseConvFloat32Backward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, stride: List[int], padding: List[int]) -> Tensor:
        conv = F.conv2d if x.dim() == 4 else F.conv3d
        ctx.save_for_backward(x, weight)
        ctx.args = (stride, padding)
        return conv(x, weight, None, stride, padding, 1, x.shape[1])

    @staticmethod
    @autocast_off
    def backward(ctx, d_out: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.args
        nd = x.dim() - 2
        f32 = torch.float32
        d_x, d_w, _ = torch.ops.aten.convolution_backward(
            d_out.to(f32), x.to(f32), weight.to(f32), None, stride, padding, [1] * nd, False, [0] * nd, x.shape[1],
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        return (None if d_x is None else d_x.to(x.dtype), None if d_w is None else d_w.to(weight.dtype), None, None)


@torch.jit.unused
def depthwise_conv(x: Tensor, weight: Tensor, stride: List[int], padding: List[int]) -> Tensor:
    """Depthwise conv (groups = channels) of x (B, C, *grid) with weight (C, 1, *kernel), whose backward
    runs in float32 whatever the forward's dtype (autocast's, for a bf16/fp16 forward).

    On CPU the bf16 kernels' backward is slower than float32's, casts included (measured, channels-last,
    backward of x and weight: 3D 2 x 96 x 8 x 56 x 56 stride 1: 271 vs 84 ms; 2D 8 x 192 x 56 x 56 stride 2:
    23 vs 9 ms; 8 x 768 x 14 x 14 stride 2: 16 vs 0.9 ms), except for 2D stride 1 (8 x 96 x 56 x 56: 1.7 vs
    10 ms), which the model leaves to autocast; their forward is the faster one. Only the backward's
    inputs are upcast, in the backward: training keeps the low-precision input, as autocast would.
    """
    device = x.device.type
    x, weight = lowered(device, [x, weight])
    with torch.autocast(device, enabled=False):
        return _DepthwiseConvFloat32Backward.apply(x, weight, list(stride), list(padding))


class _MaxPoolRecomputeIndices(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kernel: List[int], stride: List[int], padding: List[int]) -> Tensor:
        ctx.save_for_backward(x)
        ctx.args = (kernel, stride, padding)
        pool = F.max_pool2d if x.dim() == 4 else F.max_pool3d
        return pool(x, kernel, stride, padding)

    @staticmethod
    @autocast_off
    def backward(ctx, d_out: Tensor):
        (x,) = ctx.saved_tensors
        kernel, stride, padding = ctx.args
        dilation = [1] * len(kernel)
        d_out = d_out.to(x.dtype)
        if x.dim() == 4:
            _, index = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, False)
            d_x = torch.ops.aten.max_pool2d_with_indices_backward(d_out, x, kernel, stride, padding, dilation, False, index)
        else:
            _, index = torch.ops.aten.max_pool3d_with_indices(x, kernel, stride, padding, dilation, False)
            d_x = torch.ops.aten.max_pool3d_with_indices_backward(d_out, x, kernel, stride, padding, dilation, False, index)
        return d_x, None, None, None


@torch.jit.unused
def max_pool(x: Tensor, kernel: List[int], stride: List[int], padding: List[int]) -> Tensor:
    """Max pooling of x (B, C, *grid) that keeps x, not the argmax indices, for its backward."""
    return _MaxPoolRecomputeIndices.apply(x, list(kernel), list(stride), list(padding))


def add_residual(out: Tensor, residual: Tensor, skip: int) -> Tensor:
    """out + residual (B, heads, L, d), out of place, on the rows after the first `skip` only."""
    if skip == 0:
        return out + residual
    return torch.cat((out[:, :, :skip], out[:, :, skip:] + residual[:, :, skip:]), 2)


def _merge_heads(out: Tensor, residual: Optional[Tensor], skip: int) -> Tensor:
    """(out + residual, rows after `skip` only) (B, heads, L, d) -> (B, L, heads * d)."""
    if residual is not None:
        out = add_residual(out, residual, skip)
    B, H, L, d = out.shape
    return out.transpose(1, 2).reshape(B, L, H * d)


class _ResidualLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: Tensor, residual: Optional[Tensor], skip: int, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(out, residual, weight)
        ctx.skip, ctx.has_bias = skip, bias is not None
        x = _merge_heads(out, residual, skip)
        # written through a view into a fresh (B, L, C_out) tensor: the output must not be a view (the
        # block adds its shortcut in place)
        y = x.new_empty(x.shape[:-1] + weight.shape[:1])
        y2 = y.view(-1, weight.shape[0])
        _linear_into(x.reshape(y2.shape[0], -1), weight, bias, y2)
        return y

    @staticmethod
    @autocast_off
    def backward(ctx, d_y: Tensor):
        out, residual, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_y2 = d_y.reshape(-1, d_y.shape[-1])
        d_w = d_y2.t() @ _merge_heads(out, residual, ctx.skip).reshape(d_y2.shape[0], -1) if need[3] else None
        d_b = d_y2.sum(0) if need[4] and ctx.has_bias else None
        B, H, L, d = out.shape
        d_out = (d_y @ weight).view(B, L, H, d).transpose(1, 2)
        d_res: Optional[Tensor] = None
        if residual is not None and need[1]:
            d_res = d_out if ctx.skip == 0 else F.pad(d_out[:, :, ctx.skip:], [0, 0, ctx.skip, 0])
        return d_out, d_res, None, d_w, d_b


@torch.jit.unused
def residual_linear(out: Tensor, residual: Optional[Tensor], skip: int, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """linear(out + residual) with heads merged: out, residual (B, heads, L, d) -> (B, L, C_out); the
    first `skip` rows get no residual. Keeps out and residual (not their sum) for the backward."""
    device = out.device.type
    out, residual, weight, bias = lowered(device, [out, residual, weight, bias])
    with torch.autocast(device, enabled=False):
        return _ResidualLinear.apply(out, residual, skip, weight, bias)
