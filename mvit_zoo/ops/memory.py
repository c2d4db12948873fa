"""Memory-saving training: autograd functions with the plain modules' values and gradients that keep
less for backward, and the check that decides, once, whether a block may use them.

- `norm_linears`: LayerNorm then several linears (a block's q, k, v and shortcut projection), keeping
  the LayerNorm input only (its output is recomputed in backward).
- `norm_mlp`: LayerNorm -> fc1 -> GELU -> fc2, keeping the input and fc1's output: at MLP ratio 4 the
  plain modules keep 1 + 4 + 4 activation sizes, this 1 + 4. CPU inference runs it a block of rows at a
  time through one reused hidden buffer (`ROW_BLOCK_BYTES`).
- `residual_linear`: residual pooling (out + q) and the output projection, keeping out and q (which the
  attention keeps anyway), not their sum.
- `depthwise_conv`: the pooling conv with its backward in float32 where 16-bit is slow on CPU.
- `max_pool`: max pooling that keeps no int64 indices for backward (recomputed from the kept input).

Each runs its autograd function where `dispatch.select` says so, else the plain ops.
"""
import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from .dispatch import select

__all__ = ["norm_linears", "norm_mlp", "residual_linear", "max_pool", "residual_pooling", "merge_heads",
           "depthwise_conv", "not_plain", "lowered", "autocast_off", "ROW_BLOCK_BYTES"]

# CPU inference: the MLP's (..., 4 C) hidden tensor and the float32 attention mask
# (`attention.masked_attention_in_row_blocks`) are made this many bytes of rows at a time, in one reused
# buffer. glibc's malloc (PyTorch's CPU allocator on Linux) maps blocks over its mmap threshold (at most
# 32 MiB on 64-bit) from fresh pages, a page fault per 4 KiB on first write: at batch 8 the first stage's
# hidden tensor is 38.5 MB (mvit_tiny), about as slow to fault in as the GEMM that fills it.
ROW_BLOCK_BYTES = 8 << 20


def autocast_off(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Run an autograd function's backward with autocast off: autograd runs it under the autocast state
    of whoever calls `.backward()`, which would lower the float32 ops it chose to 16 bits."""
    @functools.wraps(backward)
    def run(ctx: Any, *grads: Optional[Tensor]) -> Any:
        device = next((g.device.type for g in grads if g is not None), "cpu")
        with torch.autocast(device, enabled=False):
            return backward(ctx, *grads)
    return run


def lowered(device: str, tensors: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """`tensors` cast to autocast's dtype where autocast is on for `device`, as autocast casts the inputs
    of the ops it lowers (for functions that then run with autocast off)."""
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return [None if t is None else t.to(dtype) for t in tensors]


def residual_pooling(out: Tensor, q: Tensor, skip: int) -> Tensor:
    """out + q (B, h, L, d) on the rows after the first `skip` (MViTv2's residual pooling connection)."""
    if skip == 0:
        return out + q
    return torch.cat((out[:, :, :skip], out[:, :, skip:] + q[:, :, skip:]), dim=2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, h, L, d) -> (B, L, h * d). A view of SDPA's output, whose kernels lay it out (B, L, h, d);
    under torch.export a copy, as the ONNX exporter's SDPA decomposition cannot honour that layout
    (pytorch/pytorch#136543, #141107)."""
    B, H, L, d = x.shape
    x = x.transpose(1, 2)
    if not torch.jit.is_scripting():
        if torch.compiler.is_exporting():
            x = x.clone(memory_format=torch.contiguous_format)  # (always a copy; .contiguous() may not be)
    return x.reshape(B, L, H * d)


def _linear_into(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor) -> Tensor:
    """x (N, C_in) @ weight.T (+ bias) written into out (N, C_out)."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _layer_norm_to(dtype: torch.dtype, x: Tensor, norm_dtype: torch.dtype, weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """LayerNorm of x computed in norm_dtype (as autocast runs it), output in `dtype`, and its mean and rstd."""
    out, mean, rstd = torch.native_layer_norm(x.to(norm_dtype), [x.shape[-1]], weight, bias, eps)
    return out.to(dtype), mean, rstd


class _NormLinears(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float,
                norm_dtype: torch.dtype, n: int, *weights_and_biases: Optional[Tensor]) -> Tuple[Tensor, ...]:
        weights, biases = weights_and_biases[:n], weights_and_biases[n:]
        x_norm, mean, rstd = _layer_norm_to(weights[0].dtype, x, norm_dtype, norm_weight, norm_bias, eps)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, *weights)
        ctx.eps, ctx.norm_dtype, ctx.n, ctx.has_bias = eps, norm_dtype, n, [b is not None for b in biases]
        return tuple(F.linear(x_norm, w, b) for w, b in zip(weights, biases))

    @staticmethod
    @autocast_off
    def backward(ctx, *d_outs: Optional[Tensor]):
        x_in, mean, rstd, norm_weight, norm_bias, *weights = ctx.saved_tensors
        x_norm = _layer_norm_to(weights[0].dtype, x_in, ctx.norm_dtype, norm_weight, norm_bias, ctx.eps)[0]
        x = x_in.to(ctx.norm_dtype)
        shape, n, need, first = [x.shape[-1]], ctx.n, ctx.needs_input_grad, 6  # first: index of weights[0]
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
            d_norm = d2 @ w if d_norm is None else d_norm.addmm_(d2, w)  # in place: one buffer for all
        if d_norm is None:
            return (None,) * (first + 2 * n)
        mask = [need[0], need[1] and norm_weight is not None, need[2] and norm_bias is not None]
        d_x, d_norm_w, d_norm_b = torch.ops.aten.native_layer_norm_backward(
            d_norm.view(x.shape).to(x.dtype), x, shape, mean, rstd, norm_weight, norm_bias, mask)
        return (None if d_x is None else d_x.to(x_in.dtype), d_norm_w, d_norm_b, None, None, None, *d_weights,
                *d_biases)


def norm_linears(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float,
                 weights: List[Tensor], biases: List[Optional[Tensor]]) -> List[Tensor]:
    """linear(layer_norm(x), w_i, b_i) for each i, (..., C) -> (..., C_i) each, keeping x, not the norm's
    output. Under autocast the norm runs in float32 and the linears in the autocast dtype, as autocast runs them."""
    if select("norm_linears", x) == "plain":
        x_norm = F.layer_norm(x, [x.shape[-1]], norm_weight, norm_bias, eps)
        return [F.linear(x_norm, w, b) for w, b in zip(weights, biases)]
    device = x.device.type
    norm_dtype = torch.float32 if torch.is_autocast_enabled(device) else x.dtype
    params = lowered(device, list(weights) + list(biases))
    with torch.autocast(device, enabled=False):
        return list(_NormLinears.apply(x, norm_weight, norm_bias, eps, norm_dtype, len(weights), *params))


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
        act = F.gelu(hidden)  # recomputed, and its buffer reused for the input gradient
        d_w = d_out2.t() @ act.reshape(-1, hidden.shape[-1]) if need[1] else None
        d_b = d_out2.sum(0) if need[2] and ctx.has_bias else None
        d_hidden: Optional[Tensor] = None
        if need[0]:
            d_hidden = torch.matmul(d_out, weight, out=act)
            torch.ops.aten.gelu_backward.grad_input(d_hidden, hidden, grad_input=d_hidden)
        return d_hidden, d_w, d_b


def _mlp_in_row_blocks(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                       fc2_bias: Optional[Tensor]) -> Tensor:
    """fc2(gelu(fc1(x))) without autograd, (..., C) -> (..., C_out): ROW_BLOCK_BYTES of the hidden tensor at a
    time, in one buffer (GELU in place), never the whole (..., hidden) tensor."""
    device = x.device.type
    x, w1, b1, w2, b2 = lowered(device, [x, fc1_weight, fc1_bias, fc2_weight, fc2_bias])
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    step = max(1, ROW_BLOCK_BYTES // (w1.shape[0] * x.element_size()))
    out, buffer = x.new_empty(n, w2.shape[0]), x.new_empty(min(step, n), w1.shape[0])
    with torch.autocast(device, enabled=False):
        for start in range(0, n, step):
            stop = min(n, start + step)
            hidden = torch.ops.aten.gelu_(_linear_into(rows[start:stop], w1, b1, buffer[:stop - start]))
            _linear_into(hidden, w2, b2, out[start:stop])
    return out.view(x.shape[:-1] + w2.shape[:1])


def norm_mlp(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float, fc1_weight: Tensor,
             fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor]) -> Tensor:
    """fc2(gelu(fc1(layer_norm(x)))), (..., C) -> (..., C_out), keeping x and fc1's output only; in CPU
    inference a block of rows at a time."""
    path = select("norm_mlp", x)
    if path == "rows":
        x_norm = F.layer_norm(x, [x.shape[-1]], norm_weight, norm_bias, eps)
        return _mlp_in_row_blocks(x_norm, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    hidden = norm_linears(x, norm_weight, norm_bias, eps, [fc1_weight], [fc1_bias])[0]
    if path == "plain":
        return F.linear(F.gelu(hidden), fc2_weight, fc2_bias)
    device = x.device.type
    weight, bias = lowered(device, [fc2_weight, fc2_bias])
    with torch.autocast(device, enabled=False):
        return _GeluLinear.apply(hidden, weight, bias)


class _ResidualLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: Tensor, residual: Optional[Tensor], skip: int, weight: Tensor,
                bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(out, residual, weight)
        ctx.skip, ctx.has_bias = skip, bias is not None
        x = merge_heads(out if residual is None else residual_pooling(out, residual, skip))
        # into a fresh (B, L, C_out) tensor, not a view of the GEMM's output
        y = x.new_empty(x.shape[:-1] + weight.shape[:1])
        _linear_into(x.reshape(-1, x.shape[-1]), weight, bias, y.view(-1, weight.shape[0]))
        return y

    @staticmethod
    @autocast_off
    def backward(ctx, d_y: Tensor):
        out, residual, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_y2 = d_y.reshape(-1, d_y.shape[-1])
        x = merge_heads(out if residual is None else residual_pooling(out, residual, ctx.skip))
        d_w = d_y2.t() @ x.reshape(d_y2.shape[0], -1) if need[3] else None
        d_b = d_y2.sum(0) if need[4] and ctx.has_bias else None
        B, H, L, d = out.shape
        d_out = (d_y @ weight).view(B, L, H, d).transpose(1, 2)
        d_res: Optional[Tensor] = None
        if residual is not None and need[1]:
            d_res = d_out if ctx.skip == 0 else F.pad(d_out[:, :, ctx.skip:], [0, 0, ctx.skip, 0])
        return d_out, d_res, None, d_w, d_b


def residual_linear(out: Tensor, residual: Optional[Tensor], skip: int, weight: Tensor,
                    bias: Optional[Tensor]) -> Tensor:
    """linear(merge_heads(out + residual)): out, residual (B, h, L, d) -> (B, L, C_out), the first `skip`
    rows without residual; keeps out and residual, not their sum."""
    if select("residual_linear", out) == "plain":
        return F.linear(merge_heads(out if residual is None else residual_pooling(out, residual, skip)), weight, bias)
    device = out.device.type
    out, residual, weight, bias = lowered(device, [out, residual, weight, bias])
    with torch.autocast(device, enabled=False):
        return _ResidualLinear.apply(out, residual, skip, weight, bias)


def _conv(x: Tensor, weight: Tensor, stride: List[int], padding: List[int]) -> Tensor:
    if x.dim() == 4:
        return F.conv2d(x, weight, None, stride, padding, 1, x.shape[1])
    return F.conv3d(x, weight, None, stride, padding, 1, x.shape[1])


class _DepthwiseConvFloat32Backward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, stride: List[int], padding: List[int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.args = (stride, padding)
        return _conv(x, weight, stride, padding)

    @staticmethod
    @autocast_off
    def backward(ctx, d_out: Tensor):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.args
        nd, f32 = x.dim() - 2, torch.float32
        d_x, d_w, _ = torch.ops.aten.convolution_backward(
            d_out.to(f32), x.to(f32), weight.to(f32), None, stride, padding, [1] * nd, False, [0] * nd, x.shape[1],
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        return (None if d_x is None else d_x.to(x.dtype), None if d_w is None else d_w.to(weight.dtype), None, None)


def depthwise_conv(x: Tensor, weight: Tensor, stride: List[int], padding: List[int]) -> Tensor:
    """Depthwise conv (groups = channels) of x (B, C, *grid) with weight (C, 1, *kernel), 2D or 3D."""
    if not torch.jit.is_scripting():  # (TorchScript compiles only the plain op below)
        if select("depthwise_conv", x, conv_3d_or_strided=x.dim() == 5 or max(stride) > 1) != "plain":
            device = x.device.type
            x, weight = lowered(device, [x, weight])
            with torch.autocast(device, enabled=False):
                return _DepthwiseConvFloat32Backward.apply(x, weight, list(stride), list(padding))
    return _conv(x, weight, stride, padding)


class _MaxPoolRecomputeIndices(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, kernel: List[int], stride: List[int], padding: List[int]) -> Tensor:
        ctx.save_for_backward(x)
        ctx.args = (kernel, stride, padding)
        return (F.max_pool2d if x.dim() == 4 else F.max_pool3d)(x, kernel, stride, padding)

    @staticmethod
    @autocast_off
    def backward(ctx, d_out: Tensor):
        with torch.enable_grad():  # the argmax indices, recomputed: autograd's max pooling backward
            x = ctx.saved_tensors[0].detach().requires_grad_(True)
            y = (F.max_pool2d if x.dim() == 4 else F.max_pool3d)(x, *ctx.args)
        return torch.autograd.grad(y, x, d_out.to(y.dtype))[0], None, None, None


def max_pool(x: Tensor, kernel: List[int], stride: List[int], padding: List[int]) -> Tensor:
    """Max pooling of x (B, C, *grid), 2D or 3D; in training it keeps x (which the residual stream keeps
    anyway), not the int64 argmax indices (2-4x the size of the output)."""
    if not torch.jit.is_scripting():
        if select("max_pool", x) != "plain":
            return _MaxPoolRecomputeIndices.apply(x, list(kernel), list(stride), list(padding))
    if x.dim() == 4:
        return F.max_pool2d(x, kernel, stride, padding)
    return F.max_pool3d(x, kernel, stride, padding)


def not_plain(modules: Dict[str, Optional[nn.Module]], types: Dict[str, type]) -> List[str]:
    """Why the memory-saving functions, which read these modules' parameters instead of calling them,
    would skip something: for each module that is not exactly its expected type (`types[name]`, default
    nn.Linear), has a forward patched on the instance, or carries hooks (its own or a global one), a
    reason. Read once when the model decides (`MViT.set_memory_efficient`, `train()`), not per forward."""
    reasons = []
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or _module._global_backward_pre_hooks):
        reasons.append("global module hooks are registered")
    for name, m in modules.items():
        if m is None:
            continue
        if type(m) is not types.get(name, nn.Linear):
            reasons.append(f"{name} is a {type(m).__name__}")
        elif "forward" in m.__dict__:
            reasons.append(f"{name} has a forward patched on the instance")
        elif m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            reasons.append(f"{name} has hooks")
    return reasons
