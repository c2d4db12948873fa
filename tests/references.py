"""Small reference models from the upstream libraries, and the checkpoint files they publish.

Each builder returns `(reference_model, our_name, our_kwargs)`: the reference built with the upstream
library's own constructor (timm, torchvision, pytorchvideo) at a tiny size, and the mvit-zoo
architecture + overrides that must compute the same function once its weights are converted.
`slowfast_checkpoint` and `fb_mvit_checkpoint` write the PySlowFast / facebookresearch/mvit layouts
(published key names, `{'model_state': ...}` wrapper) from a torchvision / timm reference, whose
outputs those layouts reproduce (PySlowFast's MViT equals torchvision's; facebookresearch/mvit's
equals timm's, whose own `checkpoint_filter_fn` reads that layout).
"""
from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import Tensor, nn

IMG = 32  # image side
FRAMES = 4  # video frames
DIMS = (16, 32, 64, 128)
HEADS = (1, 2, 4, 8)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter non-trivial random values (zero-initialised tables and norms too), so a
    wrongly mapped tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


# -- timm ------------------------------------------------------------------------------------------

def timm_reference(cls_token: bool = False, seed: int = 0) -> tuple[nn.Module, str, dict[str, Any]]:
    """timm MultiScaleVit (mvitv2 tiny / small_cls family), 4 stages of 1 block, 32 px, 10 classes."""
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    cfg = MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=DIMS, num_heads=HEADS, use_cls_token=cls_token)
    ref = randomize(MultiScaleVit(cfg, img_size=(IMG, IMG), num_classes=10), seed)
    name = "mvit_small_cls" if cls_token else "mvit_tiny"
    return ref, name, dict(depths=(1, 1, 1, 1), embed_dim=DIMS[0], num_heads=HEADS[0], img_size=IMG, num_classes=10)


def fb_mvit_checkpoint(timm_model: nn.Module) -> dict[str, Any]:
    """facebookresearch/mvit layout (flat `blocks.N`, block `proj`, `head.projection`, `model_state`)."""
    depths = [len(s.blocks) for s in timm_model.stages]
    starts = [sum(depths[:i]) for i in range(len(depths))]
    out = {}
    for key, value in timm_model.state_dict().items():
        m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.*)$", key)
        if m:
            rest = re.sub(r"^shortcut_proj_(attn|mlp)\.", "proj.", m.group(3))
            key = f"blocks.{starts[int(m.group(1))] + int(m.group(2))}.{rest}"
        key = key.replace("head.fc.", "head.projection.")
        out[key] = value.clone()
    return {"epoch": 300, "model_state": out, "optimizer_state": {}, "cfg": "MODEL:\n  ARCH: mvit\n"}


# -- torchvision -----------------------------------------------------------------------------------

def tv_block_setting(v2: bool, depths: tuple[int, ...]) -> list[Any]:
    """torchvision MSBlockConfigs following the pattern of torchvision's mvit_v1_b / mvit_v2_s tables."""
    from torchvision.models.video.mvit import MSBlockConfig

    blocks = []
    stride_kv = [1, 8, 8]
    dim = DIMS[0]
    n_blocks = sum(depths)
    stage_of = [s for s, d in enumerate(depths) for _ in range(d)]
    for n in range(n_blocks):
        s = stage_of[n]
        start = n > 0 and stage_of[n - 1] != s
        if start:
            stride_kv = [max(stride_kv[0], 1), max(stride_kv[1] // 2, 1), max(stride_kv[2] // 2, 1)]
        if v2:
            out = DIMS[s]
            kernel_q, stride_q = [3, 3, 3], ([1, 2, 2] if start else [1, 1, 1])
        else:
            last_of_stage = n + 1 < n_blocks and stage_of[n + 1] != s
            out = DIMS[s + 1] if last_of_stage else DIMS[s]
            kernel_q, stride_q = ([3, 3, 3], [1, 2, 2]) if start else ([], [])
        blocks.append(MSBlockConfig(num_heads=HEADS[s], input_channels=dim, output_channels=out, kernel_q=kernel_q,
                                    kernel_kv=[3, 3, 3], stride_q=stride_q, stride_kv=list(stride_kv)))
        dim = out
    return blocks


def tv_reference(v2: bool, seed: int = 0, depths: tuple[int, ...] = (1, 2, 1, 1),
                 num_classes: int = 3) -> tuple[nn.Module, str, dict[str, Any]]:
    """torchvision MViT (mvit_v2_s / mvit_v1_b family) at 4 x 32 x 32."""
    from torchvision.models.video.mvit import MViT as TVMViT

    ref = TVMViT(spatial_size=(IMG, IMG), temporal_size=FRAMES, block_setting=tv_block_setting(v2, depths),
                 residual_pool=v2, residual_with_cls_embed=not v2, rel_pos_embed=v2, proj_after_attn=v2,
                 num_classes=num_classes)
    ref = randomize(ref, seed)
    name = "mvit_v2_s_16x4" if v2 else "mvit_b_16x4"
    return ref, name, dict(depths=depths, embed_dim=DIMS[0], num_heads=HEADS[0], img_size=(FRAMES, IMG, IMG),
                           num_classes=num_classes)


def slowfast_checkpoint(tv_model: nn.Module) -> dict[str, Any]:
    """PySlowFast layout of a torchvision MViT's weights: `patch_embed.proj`, `cls_token`, `pos_embed_*`,
    flat `blocks.N.attn.{qkv,proj,pool_q,norm_q,rel_pos_h}`, `blocks.N.proj`, `norm`, `head.projection`,
    in a PySlowFast training checkpoint (`epoch`, `model_state`, `optimizer_state`, `cfg`)."""
    rules = [
        (r"^conv_proj\.", "patch_embed.proj."), (r"^pos_encoding\.class_token$", "cls_token"),
        (r"^pos_encoding\.spatial_pos$", "pos_embed_spatial"), (r"^pos_encoding\.temporal_pos$", "pos_embed_temporal"),
        (r"^pos_encoding\.class_pos$", "pos_embed_class"), (r"\.attn\.project\.0\.", ".attn.proj."),
        (r"\.attn\.pool_([qkv])\.pool\.", r".attn.pool_\1."),
        (r"\.attn\.pool_([qkv])\.norm_act\.0\.", r".attn.norm_\1."),
        (r"\.mlp\.0\.", ".mlp.fc1."), (r"\.mlp\.3\.", ".mlp.fc2."), (r"^(blocks\.\d+)\.project\.", r"\1.proj."),
        (r"^head\.1\.", "head.projection."),
    ]
    out = {}
    for key, value in tv_model.state_dict().items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        if key in ("cls_token", "pos_embed_class"):
            value = value.reshape(1, 1, -1)
        elif key in ("pos_embed_spatial", "pos_embed_temporal"):
            value = value.unsqueeze(0)
        out[key] = value.clone()
    return {"epoch": 200, "model_state": out, "optimizer_state": {"state": {}, "param_groups": []},
            "cfg": "MODEL:\n  ARCH: mvit\n  NUM_CLASSES: 3\n"}


# -- pytorchvideo ----------------------------------------------------------------------------------

def pv_reference(seed: int = 0, depths: tuple[int, ...] = (1, 2, 1, 1),
                 num_classes: int = 3) -> tuple[nn.Module, str, dict[str, Any]]:
    """pytorchvideo create_multiscale_vision_transformers (the mvit_base_16x4 recipe) at 4 x 32 x 32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pytorchvideo.models.vision_transformers import create_multiscale_vision_transformers

    starts = [sum(depths[:i]) for i in range(1, len(depths))]
    mul = [[s, 2.0] for s in starts]
    ref = create_multiscale_vision_transformers(
        spatial_size=IMG, temporal_size=FRAMES, depth=sum(depths), patch_embed_dim=DIMS[0], embed_dim_mul=mul,
        atten_head_mul=mul, pool_q_stride_size=[[s, 1, 2, 2] for s in starts], pool_kv_stride_adaptive=[1, 8, 8],
        pool_kvq_kernel=[3, 3, 3], head_num_classes=num_classes)
    ref = randomize(ref, seed)
    return ref, "mvit_b_16x4", dict(depths=depths, embed_dim=DIMS[0], num_heads=HEADS[0], img_size=(FRAMES, IMG, IMG),
                                    num_classes=num_classes, pool_norm_eps=1e-5)


def pv_checkpoint(pv_model: nn.Module) -> dict[str, Any]:
    """pytorchvideo's published file format: `{'model_state': state_dict}`."""
    return {"model_state": {k: v.clone() for k, v in pv_model.state_dict().items()}}


# -- inputs and outputs ----------------------------------------------------------------------------

def image_input(batch: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def video_input(batch: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, FRAMES, IMG, IMG, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_diff(a: nn.Module, b: nn.Module, x: Tensor) -> float:
    return (a.eval()(x) - b.eval()(x)).abs().max().item()
