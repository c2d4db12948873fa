"""Hybrid window attention (MViTv2 sec. 4.2) and the detectron2 COCO backbones `mvit_*_det`.

detectron2 is not installable here, so its rules are re-derived in this file from its source:
`detectron2/modeling/backbone/mvit.py` (`MViT.__init__`'s block loop, `MultiScaleBlock.forward`,
`MultiScaleAttention.forward`) and `detectron2/modeling/backbone/utils.py` (`window_partition`,
`window_unpartition`, `get_rel_pos`, `add_decomposed_rel_pos`).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mvit_zoo
from mvit_zoo import MODEL_CFGS
from mvit_zoo.model.mvit import MViT, block_specs

# four stages, two blocks where a stage has a global last block, so every kind of block is there
TINY: dict[str, Any] = dict(depths=(1, 2, 2, 2), embed_dim=16, num_heads=1)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Any:
    """Tiny models: one torch thread is many times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (norm scales and zero-initialised tables too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if (p.ndim == 1 and name.endswith("weight")) else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model


# -- detectron2's rules, transcribed ---------------------------------------------------------------

def d2_blocks(depth: int, last_block_indexes: tuple[int, ...], embed_dim: int = 96, num_heads: int = 1,
              adaptive_kv_stride: int = 4, adaptive_window_size: int = 56, img_size: int = 224) -> list[dict]:
    """The per-block arguments detectron2's `MViT.__init__` passes to `MultiScaleBlock` (its loop, transcribed)."""
    blocks = []
    dim_out, stride_kv, window_size = embed_dim, adaptive_kv_stride, adaptive_window_size
    input_size = img_size // 4
    for i in range(depth):
        stride_kv_ = stride_kv * 2 if i in (last_block_indexes[1], last_block_indexes[2]) else stride_kv
        window_size_ = 0 if i in last_block_indexes[1:] else window_size
        stride_q = 2 if i - 1 in last_block_indexes else 1
        blocks.append(dict(dim=embed_dim, dim_out=dim_out, num_heads=num_heads, stride_q=stride_q,
                           stride_kv=stride_kv_, window_size=window_size_, input_size=input_size))
        embed_dim = dim_out
        if i in last_block_indexes:
            dim_out *= 2
            num_heads *= 2
            stride_kv = max(stride_kv // 2, 1)
        if i - 1 in last_block_indexes:
            window_size = window_size // 2
            input_size = input_size // 2
    return blocks


def d2_window_partition(x: Tensor, window_size: int) -> tuple[Tensor, tuple[int, int]]:
    """utils.window_partition: (B, H, W, C) -> (B * nW, ws, ws, C), zero-padded at the bottom/right; (Hp, Wp)."""
    B, H, W, C = x.shape
    pad_h, pad_w = (window_size - H % window_size) % window_size, (window_size - W % window_size) % window_size
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C), (Hp, Wp)


def d2_window_unpartition(windows: Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """utils.window_unpartition: (B * nW, ws, ws, C) -> (B, H, W, C), the padding cropped."""
    (Hp, Wp), (H, W) = pad_hw, hw
    B = windows.shape[0] // (Hp * Wp // window_size // window_size)
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)[:, :H, :W]


def d2_get_rel_pos(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """utils.get_rel_pos: (q_size, k_size, C) from a table, linearly resized to 2 * max(q, k) - 1 rows."""
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=length,
                                mode="linear").reshape(-1, length).permute(1, 0)
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    return rel_pos[((q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


def d2_add_decomposed_rel_pos(attn: Tensor, q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor,
                              q_size: tuple[int, int], k_size: tuple[int, int]) -> Tensor:
    """utils.add_decomposed_rel_pos: attn (B, qh * qw, kh * kw) plus q . R_h and q . R_w."""
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    B, _, dim = q.shape
    r_q = q.reshape(B, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, d2_get_rel_pos(q_h, k_h, rel_pos_h))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, d2_get_rel_pos(q_w, k_w, rel_pos_w))
    attn = attn.view(B, q_h, q_w, k_h, k_w) + rel_h[..., None] + rel_w[:, :, :, None, :]
    return attn.view(B, q_h * q_w, k_h * k_w)


def d2_attention(a: nn.Module, x: Tensor, stride_q: int, stride_kv: int, window_size: int) -> Tensor:
    """mvit.MultiScaleAttention.forward with our module's weights: x (B, H, W, C) -> (B, H', W', C_out)."""
    B, H, W, _ = x.shape
    qkv = a.qkv(x).reshape(B, H, W, 3, a.num_heads, -1).permute(3, 0, 4, 1, 2, 5)
    q, k, v = qkv.reshape(3, B * a.num_heads, H, W, -1).unbind(0)

    def pool(t: Tensor, p: nn.Module, norm: nn.Module, stride: int) -> Tensor:
        t = F.conv2d(t.permute(0, 3, 1, 2), p.weight, stride=stride, padding=1, groups=t.shape[-1])
        return norm(t.permute(0, 2, 3, 1))

    q, k, v = (pool(q, a.pool_q, a.norm_q, stride_q), pool(k, a.pool_k, a.norm_k, stride_kv),
               pool(v, a.pool_v, a.norm_v, stride_kv))
    ori_q = q
    if window_size:
        q_win, kv_win = window_size // stride_q, window_size // stride_kv
        q, q_hw_pad = d2_window_partition(q, q_win)
        k, _ = d2_window_partition(k, kv_win)
        v, _ = d2_window_partition(v, kv_win)
        q_hw, kv_hw = (q_win, q_win), (kv_win, kv_win)
    else:
        q_hw, kv_hw = tuple(q.shape[1:3]), tuple(k.shape[1:3])
    q, k, v = (t.reshape(t.shape[0], -1, t.shape[-1]) for t in (q, k, v))
    attn = (q * a.scale) @ k.transpose(-2, -1)
    attn = d2_add_decomposed_rel_pos(attn, q, a.rel_pos_h, a.rel_pos_w, q_hw, kv_hw)
    x = (attn.softmax(dim=-1) @ v).view(-1, q_hw[0], q_hw[1], v.shape[-1])
    if window_size:
        x = d2_window_unpartition(x, q_win, q_hw_pad, tuple(ori_q.shape[1:3]))
    x = x + ori_q
    H, W = x.shape[1], x.shape[2]
    return a.proj(x.view(B, a.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1))


def d2_backbone(model: MViT, x: Tensor, blocks: list[dict]) -> list[Tensor]:
    """mvit.MViT.forward with our model's weights and detectron2's block arguments: the normed stage maps."""
    ours = [b for stage in model.stages for b in stage.blocks]
    norms = [stage.norm for stage in model.stages]
    x = model.patch_embed.proj(x).permute(0, 2, 3, 1)
    outputs = []
    for i, (blk, args) in enumerate(zip(ours, blocks)):
        x_norm = blk.norm1(x)
        x_block = d2_attention(blk.attn, x_norm, args["stride_q"], args["stride_kv"], args["window_size"])
        if args["dim"] != args["dim_out"]:
            x = blk.shortcut_proj_attn(x_norm)
        if args["stride_q"] > 1:
            s = args["stride_q"]
            x = F.max_pool2d(x.permute(0, 3, 1, 2), s + 1, s, (s + 1) // 2).permute(0, 2, 3, 1)
        x = x + x_block
        x = x + blk.mlp(blk.norm2(x))
        if i + 1 == len(ours) or blocks[i + 1]["stride_q"] > 1:
            outputs.append(norms[len(outputs)](x).permute(0, 3, 1, 2))
    return outputs


def _last_block_indexes(depths: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sum(depths[:i + 1]) - 1 for i in range(len(depths)))


# -- the block configs -----------------------------------------------------------------------------

@pytest.mark.parametrize("name,depth,last", [
    ("mvit_tiny_det", 10, (0, 2, 7, 9)),  # mask_rcnn_mvitv2_t_3x.py
    ("mvit_small_det", 16, (0, 2, 13, 15)),  # cascade_mask_rcnn_mvitv2_s_3x.py
    ("mvit_base_det", 24, (1, 4, 20, 23)),  # cascade_mask_rcnn_mvitv2_b_3x.py
    ("mvit_large_det", 48, (1, 7, 43, 47)),  # cascade_mask_rcnn_mvitv2_l_in21k_lsj_50ep.py
    ("mvit_huge_det", 80, (3, 11, 71, 79)),  # cascade_mask_rcnn_mvitv2_h_in21k_lsj_3x.py
])
def test_block_configs_follow_detectron2(name: str, depth: int, last: tuple[int, ...]) -> None:
    """Per block: Q stride, K/V stride, window, global flag, channels, heads and relative-position table size."""
    cfg = MODEL_CFGS[name]
    dims = {"mvit_large_det": (144, 2), "mvit_huge_det": (192, 3)}.get(name, (96, 1))
    expected = d2_blocks(depth, last, *dims)
    specs = [b for stage in block_specs(cfg) for b in stage]
    assert len(specs) == depth and _last_block_indexes(cfg.depths) == last
    for i, (spec, d2) in enumerate(zip(specs, expected)):
        got = dict(dim=spec.dim, dim_out=spec.dim_out, num_heads=spec.num_heads, stride_q=spec.stride_q[0],
                   stride_kv=spec.stride_kv[0], window_size=0 if spec.window is None else spec.window[0],
                   input_size=spec.grid[0])
        assert got == d2, f"block {i}"
        assert spec.stride_q[0] == spec.stride_q[1] and spec.stride_kv[0] == spec.stride_kv[1]
    model = mvit_zoo.create_model(name, pretrained=False) if depth <= 16 else None
    if model is not None:  # table sizes: detectron2's rel_dim = 2 * max(size // stride_q, size // stride_kv) - 1
        ours = [b.attn.rel_pos_h.shape[0] for stage in model.stages for b in stage.blocks]
        assert ours == [2 * max(d["input_size"] // d["stride_q"], d["input_size"] // d["stride_kv"]) - 1
                        for d in expected]
        assert not any(k.startswith(("head.fc", "norm.")) for k in model.state_dict())


def test_det_params_are_the_plain_models_without_head() -> None:
    """Same blocks as the ImageNet models detectron2 starts from: minus head, final norm and class token,
    plus a norm per stage."""
    plain = {"mvit_tiny_det": "mvit_tiny", "mvit_small_det": "mvit_small", "mvit_base_det": "mvit_base",
             "mvit_large_det": "mvit_large_cls", "mvit_huge_det": "mvit_huge_cls"}
    for det, base in plain.items():
        with torch.device("meta"):
            a, b = mvit_zoo.create_model(det), mvit_zoo.create_model(base)
        count = {n: p.numel() for n, p in a.named_parameters()}
        ref = {n: p.numel() for n, p in b.named_parameters()}
        assert a.num_classes == 0
        assert set(ref) - set(count) <= {"head.fc.weight", "head.fc.bias", "norm.weight", "norm.bias", "cls_token"}
        assert set(count) - set(ref) == {f"stages.{i}.norm.{w}" for i in range(4) for w in ("weight", "bias")}
        assert all(count[n] == ref[n] for n in set(count) & set(ref)), det


def test_bad_window_configs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="window attention is for 2D"):
        mvit_zoo.create_model("mvit_v2_s_16x4", window_size=8, use_cls_token=False, img_size=(4, 32, 32), **TINY)
    with pytest.raises(ValueError, match="use_cls_token=False"):
        mvit_zoo.create_model("mvit_small_cls", window_size=8, **TINY)
    with pytest.raises(ValueError, match="not divisible by its Q stride"):
        mvit_zoo.create_model("mvit_tiny", window_size=6, **TINY)
    with pytest.raises(ValueError, match=r"global_stages names stages \[2, 3\]"):
        mvit_zoo.create_model("mvit_tiny_det", depths=(1, 1), embed_dim=16, num_heads=1)


# -- values ----------------------------------------------------------------------------------------

def test_window_covering_the_grid_equals_global_attention() -> None:
    """Windows of the whole grid at every stage: the same pyramid and the same gradients as global attention."""
    kw = dict(TINY, img_size=64, stage_norms=True)
    plain = _randomize(mvit_zoo.create_model("mvit_tiny", **kw))
    window = mvit_zoo.create_model("mvit_tiny", window_size=16, **kw)  # grids 16, 8, 4, 2
    window.load_state_dict(plain.state_dict())
    assert all(b.attn.window_q is not None for s in window.stages for b in s.blocks)
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for model in (plain, window):
        maps = model.forward_intermediates(x, intermediates_only=True)
        sum(m.square().mean() for m in maps).backward()
        outs.append((maps, {n: p.grad for n, p in model.named_parameters()}))
    (maps_p, grads_p), (maps_w, grads_w) = outs
    for a, b in zip(maps_p, maps_w):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for n in grads_p:
        torch.testing.assert_close(grads_w[n], grads_p[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_window_attention_equals_detectron2_partitioning(fused: bool, grad: bool) -> None:
    """A grid not divisible by the windows (padded at every stage; global last blocks; doubled K/V strides):
    our pyramid equals detectron2's forward re-derived with its window_partition / window_unpartition, in each
    attention implementation the dispatch picks (SDPA kernels with autograd or without, and explicit)."""
    model = _randomize(mvit_zoo.create_model("mvit_tiny_det", img_size=128, window_size=16, **TINY))
    model.set_fused_attn(fused)
    depth = sum(TINY["depths"])
    blocks = d2_blocks(depth, _last_block_indexes(TINY["depths"]), 16, 1, adaptive_window_size=16, img_size=128)
    x = torch.randn(2, 3, 72, 104)  # grids 18x26, 9x13, 5x7, 3x4 against windows 16, 8, 4, 2
    with torch.set_grad_enabled(grad):
        ours = model.forward_intermediates(x, intermediates_only=True)
        with torch.no_grad():
            ref = d2_backbone(model, x, blocks)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if grad:
        sum(m.square().mean() for m in ours).backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_window_gradients_fused_equal_explicit() -> None:
    """The fused (CPU flash) backward through padded windows gives the explicit path's gradients."""
    x = torch.randn(1, 3, 72, 104)
    grads = []
    for fused in (True, False):
        model = _randomize(mvit_zoo.create_model("mvit_tiny_det", img_size=128, window_size=16, **TINY))
        model.set_fused_attn(fused)
        sum(m.square().mean() for m in model.forward_intermediates(x, intermediates_only=True)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5, msg=n)


def test_features_only_gives_the_normed_stage_maps() -> None:
    """features_only (timm's getter, norm off) gives each stage's map through its own norm, as detectron2's
    scale2..scale5 outputs; strides 4..32, ceil-sized on a size not divisible by 32."""
    model = _randomize(mvit_zoo.create_model("mvit_tiny_det", **TINY)).eval()
    feats = mvit_zoo.create_model("mvit_tiny_det", features_only=True, **TINY)
    feats.load_state_dict({f"model.{k}": v for k, v in model.state_dict().items()})
    x = torch.randn(1, 3, 72, 104)
    with torch.no_grad():
        maps = feats(x)
        tokens = model.forward_intermediates(x, intermediates_only=True, output_fmt="NLC")
    assert [tuple(m.shape) for m in maps] == [(1, 16, 18, 26), (1, 32, 9, 13), (1, 64, 5, 7), (1, 128, 3, 4)]
    for m, t, stage in zip(maps, tokens, model.stages):
        torch.testing.assert_close(m.flatten(2).transpose(1, 2), t)
        standard = (t - stage.norm.bias) / stage.norm.weight  # LayerNorm's output before its affine
        torch.testing.assert_close(standard.mean(-1), torch.zeros(t.shape[:2]), rtol=0, atol=1e-4)
        torch.testing.assert_close(standard.var(-1, unbiased=False), torch.ones(t.shape[:2]), rtol=0, atol=1e-3)
    assert [i["reduction"] for i in feats.feature_info] == [4, 8, 16, 32]


# -- graphs ----------------------------------------------------------------------------------------

def test_fx_feature_graph_equals_eager() -> None:
    model = _randomize(mvit_zoo.create_model("mvit_tiny_det", **TINY)).eval()
    graph = mvit_zoo.create_model("mvit_tiny_det", features_only=True, feature_cls="fx", **TINY)
    graph.load_state_dict({f"model.{k}": v for k, v in model.state_dict().items()})
    x = torch.randn(1, 3, 72, 104)
    with torch.no_grad():
        for a, b in zip(graph(x), model.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b)


def _small_window_model() -> nn.Module:
    """Two stages (an export test's size): windows, padding, a stage transition and a global block."""
    return _randomize(mvit_zoo.create_model(
        "mvit_tiny_det", img_size=64, window_size=8, depths=(1, 2), embed_dim=16, num_heads=1, global_stages=(1,),
        stride_kv_doubled=(1,), num_classes=10)).eval()


def test_torch_export_of_window_model_matches_eager() -> None:
    model = _small_window_model()
    batch = torch.export.Dim("batch", min=1, max=64)
    x = torch.randn(2, 3, 72, 104)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    for b in (3, 1):
        x = torch.randn(b, 3, 72, 104)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_onnx_export_of_window_model_runs_in_onnxruntime(tmp_path: Any) -> None:
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _small_window_model()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.randn(2, 3, 72, 104),), dynamic_shapes={"x": {0: batch}})
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    path = tmp_path / "window.onnx"
    onnx_program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 72, 104)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), atol=1e-4, rtol=0)


# -- memory at detectron2's input size ---------------------------------------------------------------

_RSS_SCRIPT = """
import json, resource, sys, time
import torch
import mvit_zoo
torch.set_num_threads(1)
model = mvit_zoo.create_model("mvit_tiny_det", features_only=True).eval()
x = torch.randn(1, 3, 1024, 1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
with torch.no_grad():
    maps = model(x)
seconds = time.perf_counter() - start
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(dict(shapes=[list(m.shape) for m in maps], grown_mib=grown, seconds=seconds)))
"""


@pytest.mark.slow
def test_features_only_at_1024_runs_in_bounded_memory() -> None:
    """mvit_tiny_det features_only at detectron2's 1024 x 1024, batch 1, CPU: peak RSS grows < 2 GiB."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shapes"] == [[1, 96, 256, 256], [1, 192, 128, 128], [1, 384, 64, 64], [1, 768, 32, 32]]
    assert result["grown_mib"] < 2048, result
    assert time.perf_counter() - start < 120
