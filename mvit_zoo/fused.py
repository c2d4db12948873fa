"""LayerNorm + MLP as one autograd function that keeps 1/4 of the activations of the plain modules.

The MLP branch of a transformer block, LayerNorm -> fc1 -> GELU -> fc2, is where most training memory
goes: autograd keeps the LayerNorm output (for fc1's weight gradient), the fc1 output (for GELU) and
the GELU output (for fc2's weight gradient): 1 + 4 + 4 times the block's activation size at the usual
MLP ratio of 4. `norm_mlp` keeps only the fc1 output and recomputes the other two in backward, which
costs one LayerNorm and one GELU, both elementwise, against the block's six GEMMs.
"""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["norm_mlp"]


class _NormMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float,
                fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor]) -> Tensor:
        shape = [x.shape[-1]]
        x_norm, mean, rstd = torch.native_layer_norm(x, shape, norm_weight, norm_bias, eps)
        hidden = F.linear(x_norm.to(fc1_weight.dtype), fc1_weight, fc1_bias)
        out = F.linear(F.gelu(hidden), fc2_weight, fc2_bias)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, fc1_weight, fc2_weight, hidden)
        ctx.eps = eps
        ctx.has_bias = (fc1_bias is not None, fc2_bias is not None)
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        x, mean, rstd, norm_weight, norm_bias, fc1_weight, fc2_weight, hidden = ctx.saved_tensors
        shape = [x.shape[-1]]
        need = ctx.needs_input_grad
        # recompute what was not kept: the LayerNorm output and the GELU output
        x_norm = torch.native_layer_norm(x, shape, norm_weight, norm_bias, ctx.eps)[0].to(fc1_weight.dtype)
        d_out2 = d_out.reshape(-1, d_out.shape[-1])
        d_fc2_w = d_out2.t() @ F.gelu(hidden).reshape(-1, hidden.shape[-1]) if need[6] else None
        d_fc2_b = d_out2.sum(0) if need[7] and ctx.has_bias[1] else None
        d_hidden = torch.ops.aten.gelu_backward(d_out @ fc2_weight, hidden)
        d_hidden2 = d_hidden.reshape(-1, d_hidden.shape[-1])
        d_fc1_w = d_hidden2.t() @ x_norm.reshape(-1, x_norm.shape[-1]) if need[4] else None
        d_fc1_b = d_hidden2.sum(0) if need[5] and ctx.has_bias[0] else None
        del x_norm
        d_norm = (d_hidden @ fc1_weight).to(x.dtype)
        mask: List[bool] = [need[0], need[1] and norm_weight is not None, need[2] and norm_bias is not None]
        d_x, d_norm_w, d_norm_b = torch.ops.aten.native_layer_norm_backward(
            d_norm, x, shape, mean, rstd, norm_weight, norm_bias, mask)
        return d_x, d_norm_w, d_norm_b, None, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b


@torch.jit.unused
def norm_mlp(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float,
             fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor]) -> Tensor:
    """fc2(gelu(fc1(layer_norm(x)))) for x (..., C) -> (..., C_out), keeping only x and fc1's output.

    Same values and gradients as the plain modules; under autocast the LayerNorm runs in float32 and
    the linears in the autocast dtype, as autocast runs them.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x = x.float()
        fc1_weight, fc2_weight = fc1_weight.to(dtype), fc2_weight.to(dtype)
        fc1_bias = None if fc1_bias is None else fc1_bias.to(dtype)
        fc2_bias = None if fc2_bias is None else fc2_bias.to(dtype)
    with torch.autocast(device, enabled=False):
        return _NormMlp.apply(x, norm_weight, norm_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
