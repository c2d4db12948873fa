"""The model against the reference implementations' own outputs, on the references' own weights.

timm `mvitv2_*` (2D MViTv2), torchvision `mvit_v1_b` / `mvit_v2_s` (3D), pytorchvideo MViT-B
(2D and 3D v1). Each reference is randomly initialised, its state dict loaded into ours (as is for
timm, converted for the others), and logits compared on random input.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Callable
from unittest import mock

import pytest
import timm
import torch
import torchvision.models.video.mvit as tv_mvit
from timm.models import mvitv2 as timm_mvitv2

import mvit_zoo
from mvit_zoo.ops import dispatch
from mvit_zoo.model import mvit as mvit_module
from mvit_zoo.weights.convert import convert_state_dict
from mvit_zoo.model.mvit import MODEL_CFGS, MViT, block_specs, make_cfg

import references

ATOL = 1e-4


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _check_both_paths(ours: MViT, ref_logits: torch.Tensor, x: torch.Tensor,
                      ref_features: torch.Tensor | None = None) -> None:
    """Fused (SDPA) and explicit attention paths both match the reference's logits (and features)."""
    with torch.no_grad():
        for fused in (True, False):
            ours.set_fused_attn(fused)
            features = ours.forward_features(x)
            logits = ours.forward_head(features)
            assert _max_diff(logits, ref_logits) < ATOL, f"fused={fused}: {_max_diff(logits, ref_logits)}"
            if ref_features is not None:
                assert _max_diff(features, ref_features) < ATOL, f"fused={fused}: features"
    ours.set_fused_attn(True)


# ------------------------------------------------------------------------------------------------
# timm (2D MViTv2)
# ------------------------------------------------------------------------------------------------

def _timm_pair(name: str, img_size: int = 224, depths: tuple[int, ...] | None = None) -> tuple[torch.nn.Module, MViT]:
    """A random timm model and ours with its state dict loaded strictly, same (possibly reduced) config."""
    timm_name = name.replace("mvit_", "mvitv2_")
    torch.manual_seed(0)
    if depths is None:
        ref = timm.create_model(timm_name, img_size=img_size)
        ours = mvit_zoo.create_model(name, img_size=img_size, num_classes=ref.num_classes)
    else:
        cfg = dataclasses.replace(timm_mvitv2.model_cfgs[timm_name], depths=depths)
        ref = timm_mvitv2.MultiScaleVit(cfg, img_size=(img_size, img_size), num_classes=10)
        ours = mvit_zoo.create_model(name, img_size=img_size, depths=depths, num_classes=10)
    ours.load_state_dict(ref.state_dict(), strict=True)  # timm's layout, no remapping
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("name", ["mvit_tiny", "mvit_small", "mvit_small_cls", "mvit_base"])
def test_timm_parity(name: str) -> None:
    ref, ours = _timm_pair(name)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = ref.forward_features(x)
        logits = ref.forward_head(feats)
    _check_both_paths(ours, logits, x, feats)


@pytest.mark.parametrize("name", ["mvit_large", "mvit_base_cls", "mvit_large_cls", "mvit_huge_cls"])
def test_timm_parity_reduced_depth(name: str) -> None:
    """The big models' switches (expand at MLP, class token, 2/3 heads at stage 0, widths) at low depth."""
    ref, ours = _timm_pair(name, img_size=64, depths=(1, 1, 2, 1))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = ref(x)
    _check_both_paths(ours, logits, x)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mvit_large", "mvit_base_cls", "mvit_large_cls", "mvit_huge_cls"])
def test_timm_parity_full_size(name: str) -> None:
    ref, ours = _timm_pair(name)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        logits = ref(x)
    _check_both_paths(ours, logits, x)


# ------------------------------------------------------------------------------------------------
# torchvision (3D v1 and v2)
# ------------------------------------------------------------------------------------------------

def _torchvision_model(tv_name: str, frames: int, size: int) -> torch.nn.Module:
    """torchvision's builder at another clip size (its builders pin 16x224x224; the block settings stay)."""
    build = tv_mvit._mvit

    def at_size(**kwargs):
        return build(**{**kwargs, "spatial_size": (size, size), "temporal_size": frames})

    with mock.patch.object(tv_mvit, "_mvit", at_size):
        return getattr(tv_mvit, tv_name)()


def _torchvision_pair(tv_name: str, name: str, frames: int, size: int) -> tuple[torch.nn.Module, MViT]:
    torch.manual_seed(0)
    ref = _torchvision_model(tv_name, frames, size).eval()
    ours = mvit_zoo.create_model(name, img_size=(frames, size, size), num_classes=400).eval()
    ours.load_state_dict(convert_state_dict(ref.state_dict(), ours), strict=True)
    return ref, ours


TORCHVISION = [("mvit_v1_b", "mvit_b_16x4"), ("mvit_v2_s", "mvit_v2_s_16x4")]


@pytest.mark.parametrize("tv_name,name", TORCHVISION)
def test_torchvision_parity(tv_name: str, name: str) -> None:
    ref, ours = _torchvision_pair(tv_name, name, frames=8, size=96)
    x = torch.randn(1, 3, 8, 96, 96)
    with torch.no_grad():
        logits = ref(x)
    _check_both_paths(ours, logits, x)


@pytest.mark.slow
@pytest.mark.parametrize("tv_name,name", TORCHVISION)
def test_torchvision_parity_full_size(tv_name: str, name: str) -> None:
    ref, ours = _torchvision_pair(tv_name, name, frames=16, size=224)
    x = torch.randn(1, 3, 16, 224, 224)
    with torch.no_grad():
        logits = ref(x)
    _check_both_paths(ours, logits, x)


# ------------------------------------------------------------------------------------------------
# pytorchvideo (MViT v1, 2D and 3D)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("builder,name,shape", [
    ("mvit_base_16x4", "mvit_b_16x4", (8, 96, 96)),
    ("mvit_base_32x3", "mvit_b_32x3", (16, 96, 96)),
    ("mvit_base_16", "mvit_v1_b_16", (224, 224)),
])
def test_pytorchvideo_parity(builder: str, name: str, shape: tuple[int, ...]) -> None:
    pytorchvideo_vt = pytest.importorskip("pytorchvideo.models.hub.vision_transformers")
    torch.manual_seed(0)
    video = len(shape) == 3
    size_kw = dict(spatial_size=shape[-1], temporal_size=shape[0]) if video else {}
    ref = getattr(pytorchvideo_vt, builder)(**size_kw).eval()
    # pytorchvideo's pooling norms use eps 1e-5 (the .pv_* tags carry this)
    ours = mvit_zoo.create_model(name, img_size=shape, num_classes=400, pool_norm_eps=1e-5).eval()
    ours.load_state_dict(convert_state_dict({"model_state": ref.state_dict()}, ours), strict=True)
    x = torch.randn((1, 3) + shape)
    with torch.no_grad():
        logits = ref(x)
    _check_both_paths(ours, logits, x)


def test_pytorchvideo_tag_carries_its_norm_eps() -> None:
    """The .pv_* weights need pytorchvideo's eps; the torchvision tag keeps 1e-6."""
    kw = dict(depths=(1, 1, 1, 1), embed_dim=16, img_size=(4, 32, 32))
    pv = mvit_zoo.create_model("mvit_b_16x4.pv_k400", **kw)
    tv = mvit_zoo.create_model("mvit_b_16x4.tv_k400", **kw)
    assert pv.stages[1].blocks[0].attn.norm_q.eps == 1e-5
    assert tv.stages[1].blocks[0].attn.norm_q.eps == 1e-6


# ------------------------------------------------------------------------------------------------
# Structure
# ------------------------------------------------------------------------------------------------

def test_v1_pools_q_only_at_stage_starts_and_v2_everywhere() -> None:
    v1 = [b.kernel_q is not None for s in block_specs(MODEL_CFGS["mvit_b_16x4"]) for b in s]
    v2 = [b.kernel_q is not None for s in block_specs(MODEL_CFGS["mvit_v2_s_16x4"]) for b in s]
    assert [i for i, q in enumerate(v1) if q] == [1, 3, 14]
    assert all(v2)


def test_b24_pooling_follows_strides() -> None:
    """SlowFast's MVIT_B_32x3_CONV sets no POOL_KVQ_KERNEL: kernels are stride + 1 (and none where stride 1)."""
    specs = [b for s in block_specs(MODEL_CFGS["mvit_b24_32x3"]) for b in s]
    assert len(specs) == 24
    assert [i for i, b in enumerate(specs) if b.kernel_q] == [2, 5, 21]
    assert specs[2].kernel_q == (1, 3, 3)
    assert {b.kernel_kv for b in specs[:2]} == {(1, 9, 9)}
    assert specs[3].kernel_kv == (1, 5, 5) and specs[6].kernel_kv == (1, 3, 3)
    assert all(b.kernel_kv is None for b in specs[21:])
    # v1 widens in the MLP of the block before each stage start
    assert [i for i, b in enumerate(specs) if b.dim != b.dim_out] == [1, 4, 20]


def test_2d_and_3d_share_one_implementation() -> None:
    """A video model on a one-frame clip with 1-frame kernels is the image model."""
    torch.manual_seed(0)
    img = mvit_zoo.create_model("mvit_tiny", depths=(1, 1, 1, 1), embed_dim=16, img_size=32, num_classes=5).eval()
    cfg3 = make_cfg(img.cfg, patch_kernel=(1, 7, 7), patch_stride=(1, 4, 4), patch_padding=(0, 3, 3),
                    kernel_qkv=(1, 3, 3), stride_q=(1, 2, 2), stride_kv_adaptive=(1, 4, 4), img_size=(1, 32, 32))
    vid = MViT(cfg3, num_classes=5).eval()
    sd = {k: (v.unsqueeze(2) if v.ndim == 4 else v) for k, v in img.state_dict().items()}
    vid.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _max_diff(img(x), vid(x.unsqueeze(2))) < 1e-5


def test_frozen_config_and_overrides() -> None:
    cfg = MODEL_CFGS["mvit_tiny"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.depths = (1, 1, 1, 1)  # type: ignore[misc]
    small = make_cfg(cfg, embed_dim=16, num_heads=2, img_size=48)
    assert small.embed_dim == (16, 32, 64, 128) and small.num_heads == (2, 4, 8, 16) and small.img_size == (48, 48)
    video = make_cfg(MODEL_CFGS["mvit_v2_s_16x4"], img_size=112, num_frames=8)
    assert video.img_size == (8, 112, 112)
    with pytest.raises(TypeError, match="unknown MViT config field"):
        make_cfg(cfg, depth=3)
    with pytest.raises(ValueError, match="not divisible"):
        make_cfg(cfg, embed_dim=10, num_heads=3)


# ------------------------------------------------------------------------------------------------
# Training: gradients equal the reference's (the memory-saving training paths included)
# ------------------------------------------------------------------------------------------------

def _input_and_param_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    logits = model(x)
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _rel_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    # (+ 1e-6 absolute: some gradients are 0 in exact arithmetic, e.g. the K-norm bias, which shifts every
    # logit of a row equally; both implementations leave float32 noise there)
    return (a - b).abs().max().item() <= tol * b.abs().max().item() + 1e-6


@pytest.mark.parametrize("cls_token", [False, True], ids=["no_cls", "cls"])
def test_timm_gradient_parity(cls_token: bool) -> None:
    """Every parameter's gradient and the input gradient equal timm's (same weights, same loss)."""
    ref, name, kwargs = references.timm_reference(cls_token)
    ours = mvit_zoo.create_model(name, **kwargs).eval()  # eval: no dropout; autograd still records
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = references.image_input()
    ref_dx, ref_grads = _input_and_param_grads(ref, x)
    for fused, efficient in [(True, True), (False, True), (True, False)]:
        ours.set_fused_attn(fused)
        ours.set_memory_efficient(efficient)
        dx, grads = _input_and_param_grads(ours, x)
        assert _rel_close(dx, ref_dx), f"fused={fused}, memory_efficient={efficient}: input grad"
        assert grads.keys() == ref_grads.keys()
        bad = [n for n in grads if not _rel_close(grads[n], ref_grads[n])]
        assert not bad, f"fused={fused}, memory_efficient={efficient}: gradients differ for {bad}"


def test_memory_efficient_training_keeps_less() -> None:
    """`set_memory_efficient` (on by default) is what makes a training step keep less for backward."""
    model = mvit_zoo.create_model("mvit_tiny", depths=(1, 2, 1, 1)).train()
    x = torch.randn(2, 3, 224, 224)

    def saved_bytes() -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(storages.values())

    efficient = saved_bytes()
    model.set_memory_efficient(False)
    plain = saved_bytes()
    assert efficient < 0.8 * plain, (efficient, plain)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["mvit_tiny", "mvit_small_cls"])
def test_blocks_get_contiguous_tokens(name: str, train: bool) -> None:
    """Every block's input is contiguous: the residual sums keep their first operand's layout, so strided
    patch tokens would stay strided through the first stage (and make it slower, not wrong)."""
    model = mvit_zoo.create_model(name, depths=(2, 1, 1, 1)).train(train)
    strided: list[str] = []
    for n, m in model.named_modules():
        if isinstance(m, mvit_module.MultiScaleBlock):
            m.register_forward_pre_hook(
                lambda _, args, n=n: None if args[0].is_contiguous() else strided.append(f"{n}: {args[0].stride()}"))
    model.set_memory_efficient(True)  # (block hooks do not make the blocks step aside; check that)
    assert all(m.memory_efficient for m in model.modules() if isinstance(m, mvit_module.MultiScaleBlock))
    with torch.set_grad_enabled(train):
        model(torch.randn(2, 3, 64, 64))
    assert not strided, strided


@pytest.mark.parametrize("v2", [True, False], ids=["mvit_v2_s", "mvit_v1_b"])
def test_torchvision_input_gradient_parity(v2: bool) -> None:
    """Video: the input gradient (which flows through every layer, rel-pos tables included) equals
    torchvision's."""
    ref, name, kwargs = references.tv_reference(v2)
    ours = mvit_zoo.create_model(name, **kwargs).eval()
    ours.load_state_dict(convert_state_dict(ref.state_dict(), ours), strict=True)
    x = references.video_input()
    ref_dx, ref_grads = _input_and_param_grads(ref.eval(), x)
    dx, grads = _input_and_param_grads(ours, x)
    assert _rel_close(dx, ref_dx)
    # the rel-pos tables' gradients (v2), which the memory-saving CPU attention computes itself
    tables = [n for n in grads if ".rel_pos_" in n]
    assert len(tables) == (3 * sum(kwargs["depths"]) if v2 else 0)
    flat = [f"stages.{i}.blocks.{j}." for i, d in enumerate(kwargs["depths"]) for j in range(d)]
    for n in tables:
        block, _, rest = n.partition(".attn.")
        tv_name = f"blocks.{flat.index(block + '.')}.attn.{rest}"
        assert _rel_close(grads[n], ref_grads[tv_name]), n


def _small_reference_pair(which: str) -> tuple[torch.nn.Module, MViT, dict, torch.Tensor]:
    """references' small timm model (which: 'timm', 'timm_cls') or torchvision mvit_v2_s ('torchvision_v2'),
    ours with its weights, our build kwargs and an input."""
    if which.startswith("timm"):
        ref, name, kwargs = references.timm_reference(cls_token=which == "timm_cls")
        ours = mvit_zoo.create_model(name, **kwargs).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        return ref.eval(), ours, kwargs, references.image_input()
    ref, name, kwargs = references.tv_reference(True)
    ours = mvit_zoo.create_model(name, **kwargs).eval()
    ours.load_state_dict(convert_state_dict(ref.state_dict(), ours), strict=True)
    return ref.eval(), ours, kwargs, references.video_input()


@pytest.mark.parametrize("which", ["timm", "torchvision_v2"])
def test_bf16_autocast_matches_reference_and_float32(which: str) -> None:
    """CPU bf16 autocast: logits agree with the reference under the same autocast, and the training
    gradients (through the memory-saving paths) point where the float32 ones do."""
    ref, ours, _, x = _small_reference_pair("timm_cls" if which == "timm" else which)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, ref_logits = ours(x), ref.eval()(x)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - ref_logits.float()).abs().max() <= 0.05 * ref_logits.float().abs().max()

    _, grads32 = _input_and_param_grads(ours, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, grads16 = _input_and_param_grads(ours, x)
    flat32 = torch.cat([grads32[n].flatten() for n in grads32])
    flat16 = torch.cat([grads16[n].flatten().float() for n in grads32])
    assert torch.isfinite(flat16).all()
    assert torch.nn.functional.cosine_similarity(flat16, flat32, dim=0) > 0.99


def _assert_same_function(model: torch.nn.Module, ref: torch.nn.Module, x: torch.Tensor, train: bool,
                          ref_name: Callable[[str], str] = lambda name: name) -> None:
    """model equals ref: logits in eval, or input and parameter gradients in train mode (ref's parameter
    `name` is model's `ref_name(name)`)."""
    model.train(train), ref.train(train)
    if train:
        d_x, grads = _input_and_param_grads(model, x)
        ref_d_x, ref_grads = _input_and_param_grads(ref, x)
        assert _rel_close(d_x, ref_d_x)
        for name, grad in ref_grads.items():
            assert _rel_close(grads[ref_name(name)], grad), name
    else:
        with torch.no_grad():
            assert _max_diff(model(x), ref(x)) < ATOL


class _ShiftedLinear(torch.nn.Linear):
    """A Linear whose forward differs from its weights' (as a LoRA or quantised wrapper's does): +0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.5


def _shifted(linear: torch.nn.Linear) -> _ShiftedLinear:
    out = _ShiftedLinear(linear.in_features, linear.out_features)
    out.load_state_dict(linear.state_dict())
    return out


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_replaced_or_hooked_linears_are_called(mode: str) -> None:
    """The memory-saving path reads qkv/proj/fc1/fc2 weights directly; a module put in their place (here one
    that adds 0.5) must still be called, in inference and in training (`train()` sees it and the blocks call
    their modules): the model then equals one whose biases carry the +0.5. A forward hook on a plain linear
    runs too."""
    _, ours, _, x = _small_reference_pair("timm")
    baked = copy.deepcopy(ours)
    names = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
    for block, ref_block in zip(ours.modules(), baked.modules()):
        if isinstance(block, mvit_module.MultiScaleBlock):
            for name in names:
                parent, attr = name.split(".")
                linear = getattr(getattr(block, parent), attr)
                setattr(getattr(block, parent), attr, _shifted(linear))
                with torch.no_grad():
                    getattr(getattr(ref_block, parent), attr).bias += 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the memory-saving path steps aside, and says so: tested below)
        _assert_same_function(ours, baked, x, train=mode == "train")
    calls = []
    baked.stages[0].blocks[0].attn.qkv.register_forward_hook(lambda *a: calls.append(1))
    baked.eval()
    with torch.no_grad():
        baked(x)
    assert calls == [1]


class _Wrapper(torch.nn.Module):
    """Another module in place of a block's attention or MLP (as adapter libraries put there)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *args):
        self.calls += 1
        return self.inner(*args)


@pytest.mark.parametrize("train", [False, True])
def test_replaced_attention_and_mlp_modules_are_called(train: bool) -> None:
    """A block whose `attn` or `mlp` is another module calls it, in inference and memory-saving training,
    with the same values as before (no AttributeError from a fast path that expects ours)."""
    _, ours, _, x = _small_reference_pair("timm")
    wrapped = copy.deepcopy(ours)
    blocks = [b for b in wrapped.modules() if isinstance(b, mvit_module.MultiScaleBlock)]
    for block in blocks:
        block.attn, block.mlp = _Wrapper(block.attn), _Wrapper(block.mlp)
    _assert_same_function(wrapped, ours, x, train,
                          lambda name: name.replace(".attn.", ".attn.inner.").replace(".mlp.", ".mlp.inner."))
    assert all(b.attn.calls == 1 and b.mlp.calls == 1 for b in blocks)


@pytest.mark.parametrize("train", [False, True])
def test_instance_patched_forward_and_global_hooks_are_called(train: bool) -> None:
    """A forward patched on a plain nn.Linear instance (as LoRA injectors do) runs on the fast paths,
    and a global forward hook (nn.modules.module.register_module_forward_hook) sees every linear."""
    _, ours, _, x = _small_reference_pair("timm")
    baked = copy.deepcopy(ours)
    for block, ref_block in zip(ours.modules(), baked.modules()):
        if isinstance(block, mvit_module.MultiScaleBlock):
            for parent, ref_parent, attr in ((block.attn, ref_block.attn, "qkv"), (block.mlp, ref_block.mlp, "fc1")):
                linear = getattr(parent, attr)
                linear.forward = lambda t, plain=linear.forward: plain(t) + 0.5
                with torch.no_grad():
                    getattr(ref_parent, attr).bias += 0.5
    _assert_same_function(ours, baked, x, train)
    seen: list = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(m))
    try:
        if train:
            with pytest.warns(UserWarning, match="global module hooks"):
                baked.train()  # where the memory-saving path is decided
            _input_and_param_grads(baked, x)
        else:
            baked.eval()  # (where the model checks its modules: qkv's forward, not slices of its weight)
            with torch.no_grad():
                baked(x)
    finally:
        handle.remove()
    linears = [m for m in baked.modules() if isinstance(m, torch.nn.Linear)]
    assert all(any(m is s for s in seen) for m in linears)


@pytest.mark.parametrize("on", ["linears_and_norms", "branches"])
def test_hooks_run_in_training(on: str) -> None:
    """Forward and full backward hooks (attention maps, gradient inspection, Grad-CAM) fire in training
    with the same gradients: on a block's linears and LayerNorms the memory-saving path, which would not
    call them, steps aside; on its attention or MLP module the residual add does not write into the
    hooked output (autograd forbids that)."""
    _, ours, _, x = _small_reference_pair("timm")
    hooked = copy.deepcopy(ours)
    block = next(m for m in hooked.modules() if isinstance(m, mvit_module.MultiScaleBlock))
    modules = ([block.norm1, block.attn.qkv, block.attn.proj, block.norm2, block.mlp.fc1, block.mlp.fc2]
               if on == "linears_and_norms" else [block.attn, block.mlp])
    seen: list = []
    for module in modules:
        module.register_full_backward_hook(lambda m, d_in, d_out: seen.append(("backward", m)))
        module.register_forward_hook(lambda m, args, out: seen.append(("forward", m)))
    _assert_same_function(hooked, ours, x, train=True)
    assert len(seen) == 2 * len(modules)


def test_hooks_run_in_inference() -> None:
    """Forward hooks on a block's linears and LayerNorms (feature and attention-map tools) fire in inference,
    where the memory-efficient block would run the MLP in row blocks and q/k/v from slices of qkv's weight,
    with the same logits and the hooked modules' whole outputs."""
    _, ours, _, x = _small_reference_pair("timm")
    hooked = copy.deepcopy(ours)
    block = next(m for m in hooked.modules() if isinstance(m, mvit_module.MultiScaleBlock))
    modules = [block.norm1, block.attn.qkv, block.attn.proj, block.norm2, block.mlp.fc1, block.mlp.fc2]
    seen: list = []
    for module in modules:
        module.register_forward_hook(lambda m, args, out: seen.append((m, out.clone())))
    _assert_same_function(hooked, ours, x, train=False)
    assert [m for m, _ in seen] == modules
    fc1_out = next(out for m, out in seen if m is block.mlp.fc1)
    assert fc1_out.shape[-1] == block.mlp.fc1.out_features and fc1_out.min() < 0  # before GELU, whole


def test_memory_saving_path_steps_aside_with_a_message_naming_why() -> None:
    """Decided once, at `set_memory_efficient` / `train()`: a hooked or replaced module turns the memory-saving
    path off for its block, with a warning naming the block and the module; plain blocks keep it."""
    model = mvit_zoo.create_model("mvit_tiny", depths=(1, 1, 1, 1)).train()
    assert all(b.memory_efficient for b in model.modules() if isinstance(b, mvit_module.MultiScaleBlock))
    model.stages[1].blocks[0].mlp.fc2.register_forward_hook(lambda *a: None)
    model.stages[2].blocks[0].attn.qkv = _shifted(model.stages[2].blocks[0].attn.qkv)
    with pytest.warns(UserWarning, match=r"off for 2 of 4 blocks.*stages\.1\.blocks\.0: mlp\.fc2 has hooks.*"
                                         r"stages\.2\.blocks\.0: attn\.qkv is a _ShiftedLinear"):
        model.train()
    flags = [b.memory_efficient for b in model.modules() if isinstance(b, mvit_module.MultiScaleBlock)]
    assert flags == [True, False, False, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.eval()  # (inference steps aside too, without a warning: it keeps nothing for backward)
        assert flags == [b.memory_efficient for b in model.modules() if isinstance(b, mvit_module.MultiScaleBlock)]
        model.set_memory_efficient(False)
        model.train()
    assert not any(b.memory_efficient for b in model.modules() if isinstance(b, mvit_module.MultiScaleBlock))


def test_global_switch_builds_explicit_attention(monkeypatch) -> None:
    """`mvit_zoo.ops.set_fused_attn(False)` (timm's set_fused_attn; MVIT_FUSED_ATTN=0) fixes the explicit path
    for models built after it, with the same logits."""
    model = mvit_zoo.create_model("mvit_tiny", depths=(1, 1, 1, 1), img_size=64).eval()
    monkeypatch.setattr(dispatch, "_USE_FUSED_ATTN", dispatch._USE_FUSED_ATTN)
    mvit_zoo.ops.set_fused_attn(False)
    explicit = mvit_zoo.create_model("mvit_tiny", depths=(1, 1, 1, 1), img_size=64).eval()
    explicit.load_state_dict(model.state_dict())
    assert all(not m.fused_attn for m in explicit.modules() if isinstance(m, mvit_module.MultiScaleAttention))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(explicit(x), model(x)) < ATOL
