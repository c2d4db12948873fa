"""The one place that decides which implementation of an op runs, and the global attention switch.

`MVIT_FUSED_ATTN=0` in the environment (or false/no/off/disable, any case; or `set_fused_attn(False)`
before building a model) makes new attention modules take the explicit softmax(q k^T * scale + bias) v
path, as timm's `TIMM_FUSED_ATTN` does; a built model switches with `MViT.set_fused_attn`.
"""
import os
import warnings

import torch
from torch import Tensor

__all__ = ["select", "use_fused_attn", "set_fused_attn", "env_flag", "HAS_CPU_FLASH", "GEMM_BACKWARD_MAX_PAIRS"]

_FLAG_VALUES = {"1": True, "true": True, "yes": True, "on": True, "enable": True,
                "0": False, "false": False, "no": False, "off": False, "disable": False}


def env_flag(name: str, default: bool) -> bool:
    """The boolean environment variable `name`: 1/true/yes/on/enable or 0/false/no/off/disable, any case;
    `default` when unset or empty, and also (with a warning naming the variable) for any other value."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    flag = _FLAG_VALUES.get(value.lower())
    if flag is None:
        warnings.warn(f"{name}={value!r} is not a recognised value; using {name}={int(default)}. Set it to one of "
                      f"{', '.join(_FLAG_VALUES)} (any case)", RuntimeWarning, stacklevel=2)
        return default
    return flag


# NOTE: read once, at import, so a bad value warns once per process
_USE_FUSED_ATTN = env_flag("MVIT_FUSED_ATTN", True)

# SDPA's CPU flash kernel and its backward, as ATen ops (private names; they exist from torch 2.2)
HAS_CPU_FLASH = all(hasattr(torch.ops.aten, name) for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"))

# bf16 CPU training: attentions of at most this many query-key pairs (per image and head) take their
# backward as batched GEMMs, 1.5-4x faster than the flash kernel's there (mvit_tiny/small's 196 x 196,
# 49 x 196, 49 x 49; without it mvit_small's bf16 training step is ~10% slower) and as accurate. Not
# fp16: its small dS entries would lose digits in 16-bit GEMM inputs.
GEMM_BACKWARD_MAX_PAIRS = 64 * 1024


def use_fused_attn() -> bool:
    """Whether attention modules built from now on use scaled_dot_product_attention (default)."""
    return _USE_FUSED_ATTN


def set_fused_attn(enable: bool = True) -> None:
    """Default of `fused_attn` for attention modules built from now on (fixed at construction)."""
    global _USE_FUSED_ATTN
    _USE_FUSED_ATTN = enable


def _16bit(x: Tensor) -> bool:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type) != torch.float32
    return x.element_size() < 4


@torch.jit.unused
def select(op: str, x: Tensor, fused_attn: bool = True, rel_pos: bool = True, video: bool = False,
           conv_3d_or_strided: bool = False, pairs: int = 0) -> str:
    """The implementation of `op` for its first input `x`; the first row that holds applies.

    ======================================  ==========================================================  ================
    op                                      condition                                                   implementation
    ======================================  ==========================================================  ================
    attention                               fused_attn is False (MVIT_FUSED_ATTN=0, set_fused_attn)     explicit
    attention                               no relative-position table                                  sdpa
    attention                               torch.compile / torch.export capture                        sdpa_mask
    attention                               a device other than CPU/CUDA (meta: shapes, FLOP counts)    sdpa_mask
    attention                               CPU, autograd records, CPU flash ops present                cpu_flash
    attention                               CPU, autograd off, float32, 2D                              sdpa_mask_rows
    attention                               otherwise (CPU 16-bit or video inference, CUDA)             sdpa_augmented
    attention_backward (of cpu_flash)       bf16, at most GEMM_BACKWARD_MAX_PAIRS query-key pairs       gemm
    attention_backward (of cpu_flash)       otherwise                                                   kernel
    norm_mlp                                eager CPU, autograd off                                     rows
    norm_linears, norm_mlp, residual_linear graph capture, autograd off, or a device other than         plain
    max_pool                                CPU/CUDA (meta: autocast has no such device)
    norm_linears, norm_mlp, residual_linear otherwise                                                   recompute
    max_pool
    depthwise_conv                          eager CPU, autograd records, 16-bit (dtype or autocast),    float32_backward
                                            3D or strided
    depthwise_conv                          otherwise                                                   plain
    ======================================  ==========================================================  ================

    explicit: the (Nq, Nk) logits plus `attention.rel_pos_bias`, softmax, times v (the reference).
    gemm: the backward of softmax(q k^T) v as batched GEMMs (`attention._gemm_backward`); kernel: SDPA's
    CPU flash backward.
    sdpa_mask_rows: SDPA with the mask made `memory.ROW_BLOCK_BYTES` at a time in one buffer
    (`attention.masked_attention_in_row_blocks`): for float32 2D the mask costs less than the longer
    heads and padded v of sdpa_augmented (ablation: 0.89x peak inference memory, speed within noise),
    not for video (3% slower).
    sdpa: `F.scaled_dot_product_attention` without a mask. sdpa_mask: the same with the bias as its
    mask (graphs keep their own choices; ONNX takes it as it is). sdpa_augmented: the bias folded into
    q . k (`attention.augment_qk`), SDPA with no mask, so every fused kernel applies (CPU flash, CUDA
    flash / memory-efficient / cuDNN); autograd through it on CUDA. cpu_flash: the same through SDPA's
    CPU flash forward and backward ops in one autograd function that keeps q, k, v, the output and the
    row log-sum-exp, no (Nq, Nk) or augmented tensor (SDPA's CPU math fallback would keep the mask and
    the probabilities). recompute: the `memory` autograd functions, which keep inputs and recompute
    LayerNorm / GELU outputs (max pooling: argmax indices) in backward. rows: fc1 -> GELU in place -> fc2,
    `memory.ROW_BLOCK_BYTES` of hidden rows at a time, into one output. float32_backward: CPU 16-bit
    depthwise conv backward is 3-30x slower than float32's with the casts on 3D or strided convs (2D
    stride 1: faster; kept there).
    """
    eager = not torch.compiler.is_compiling()  # torch.compile and torch.export
    recording = eager and torch.is_grad_enabled()
    if op == "attention":
        if not fused_attn:
            return "explicit"
        if not rel_pos:
            return "sdpa"
        if not eager or x.device.type not in ("cpu", "cuda"):
            return "sdpa_mask"
        if x.device.type == "cpu" and x.requires_grad and recording and HAS_CPU_FLASH:
            return "cpu_flash"
        if x.device.type == "cpu" and not recording and not video and not _16bit(x):
            return "sdpa_mask_rows"
        return "sdpa_augmented"
    if op == "attention_backward":  # of cpu_flash; pairs: query-key pairs per image and head
        return "gemm" if x.dtype == torch.bfloat16 and pairs <= GEMM_BACKWARD_MAX_PAIRS else "kernel"
    if op == "norm_mlp" and eager and not recording and x.device.type == "cpu":
        return "rows"
    if op in ("norm_linears", "norm_mlp", "residual_linear", "max_pool"):
        return "recompute" if recording and x.device.type in ("cpu", "cuda") else "plain"
    if op == "depthwise_conv":
        slow = x.device.type == "cpu" and conv_3d_or_strided and _16bit(x)
        return "float32_backward" if recording and slow else "plain"
    raise ValueError(f"no implementations of {op!r}")
