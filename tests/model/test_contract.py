"""The contract every registered model keeps, checked as timm checks its models: forward, backward (every
parameter gets a gradient), reset_classifier, forward_intermediates / features_only against feature_info,
TorchScript, torch.fx. Each architecture runs shrunk (four stages of one or two blocks, 16 channels, a
64 px image or a 4 x 64 x 64 clip: every architecture switch kept, a fraction of a second per case); the
full-size configurations are built on the meta device."""
from __future__ import annotations

import math

import pytest
import torch
from timm.layers import get_notrace_functions, get_notrace_modules
from timm.models._features_fx import get_graph_node_names
from torchvision.models.feature_extraction import create_feature_extractor
from torch import Tensor, nn

import mvit_zoo
from mvit_zoo import MODEL_CFGS

MODELS = mvit_zoo.list_models()
# four stages (as every variant has), a second block in stage 2 (a block without a Q stride), more heads later
TINY = dict(depths=(1, 1, 2, 1), embed_dim=16, num_heads=(1, 2, 2, 4))
IMAGE_SIZE = (64, 64)
CLIP_SIZE = (4, 64, 64)
NUM_CLASSES = 5
BATCH = 2

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.parametrize("name", MODELS)]


def _size(name: str) -> tuple[int, ...]:
    return CLIP_SIZE if MODEL_CFGS[name].ndim == 3 else IMAGE_SIZE


def tiny(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """`name` shrunk to TINY at its test size; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return mvit_zoo.create_model(name, **TINY, img_size=_size(name), num_classes=NUM_CLASSES, **kwargs)


def sample(name: str, batch: int = BATCH, seed: int = 1) -> Tensor:
    return torch.randn((batch, 3) + _size(name), generator=torch.Generator().manual_seed(seed))


def expected_shapes(feature_info: list[dict], size: tuple[int, ...], batch: int = BATCH) -> list[tuple[int, ...]]:
    """(B, C_i, *ceil(size / stride_i)) per stage: NCHW for images, NCTHW for video."""
    shapes = []
    for info in feature_info:
        strides = info.get("stride", (info["reduction"],) * 2)
        assert strides[-1] == info["reduction"]
        shapes.append((batch, info["num_chs"]) + tuple(math.ceil(n / s) for n, s in zip(size, strides)))
    return shapes


def assert_all_grads(model: nn.Module) -> None:
    """timm's backward check: every trainable parameter received a finite gradient."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"


# --------------------------------------------------------------------------------------------------
# forward, backward, classifier
# --------------------------------------------------------------------------------------------------

def test_forward(name: str) -> None:
    model = tiny(name).eval()
    x = sample(name)
    with torch.no_grad():
        out = model(x)
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
    assert out.shape == (BATCH, NUM_CLASSES) and torch.isfinite(out).all()
    assert tokens.shape[0] == BATCH and tokens.shape[-1] == model.num_features
    assert pooled.shape == (BATCH, model.num_features)
    torch.testing.assert_close(model.forward_head(tokens), out)


def test_backward(name: str) -> None:
    model = tiny(name).train()
    out = model(sample(name))
    assert out.shape == (BATCH, NUM_CLASSES)
    out.mean().backward()
    if model.cfg.stage_norms:  # the norms of stages 0-2 feed only the pyramid maps (detection backbones)
        sum(m.mean() for m in model.forward_intermediates(sample(name), intermediates_only=True)).backward()
    assert_all_grads(model)


def test_reset_classifier(name: str) -> None:
    model = tiny(name).eval()
    x = sample(name)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)

        model.reset_classifier(0)
        assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
        torch.testing.assert_close(model(x), pooled)

        model.reset_classifier(7)
        assert model.get_classifier().out_features == 7 and model(x).shape == (BATCH, 7)

        model.reset_classifier(0, global_pool="")  # no pooling: the tokens as they are
        torch.testing.assert_close(model(x), tokens)

        model.reset_classifier(3, global_pool="avg")  # mean of the grid tokens, class token or not
        grid = tokens[:, model.num_prefix_tokens:]
        torch.testing.assert_close(model(x), model.get_classifier()(grid.mean(dim=1)))


# --------------------------------------------------------------------------------------------------
# feature pyramid
# --------------------------------------------------------------------------------------------------

def test_forward_intermediates_match_feature_info(name: str) -> None:
    model = tiny(name).eval()
    x = sample(name)
    shapes = expected_shapes(model.feature_info, _size(name))
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        only = model.forward_intermediates(x, intermediates_only=True)
        tokens = model.forward_features(x)
    assert len(model.feature_info) == len(maps) == 4
    assert [tuple(m.shape) for m in maps] == shapes
    torch.testing.assert_close(final, tokens)
    for a, b in zip(maps, only):
        torch.testing.assert_close(a, b)


def test_features_only_matches_forward_intermediates(name: str) -> None:
    model = tiny(name).eval()
    features = tiny(name, features_only=True).eval()  # same seed: same weights
    x = sample(name)
    info = features.feature_info
    assert info.channels() == [i["num_chs"] for i in model.feature_info]
    assert info.reduction() == [i["reduction"] for i in model.feature_info]
    with torch.no_grad():
        maps = features(x)
        ref = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == expected_shapes(model.feature_info, _size(name))
    for a, b in zip(maps, ref):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------
# TorchScript and torch.fx
# --------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated in torch 2.14
def test_torchscript(name: str) -> None:
    model = tiny(name).eval()
    scripted = torch.jit.script(model)
    x = sample(name)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-5, rtol=0)


def _fx_final_node(model: nn.Module) -> nn.Module:
    """timm's fx check: a feature extractor that returns the graph's last node, in train and in eval mode."""
    train_nodes, eval_nodes = get_graph_node_names(model)
    tracer_kwargs = {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


def test_fx_forward(name: str) -> None:
    model = tiny(name).eval()
    fx_model = _fx_final_node(model).eval()
    x = sample(name)
    with torch.no_grad():
        (out,) = fx_model(x).values()
        torch.testing.assert_close(out, model(x))


def test_fx_backward(name: str) -> None:
    model = tiny(name).train()
    fx_model = _fx_final_node(model).train()
    (out,) = fx_model(sample(name)).values()
    assert out.shape == (BATCH, NUM_CLASSES)
    out.mean().backward()
    assert_all_grads(fx_model)


def test_fx_features_only_matches_eager(name: str) -> None:
    eager = tiny(name, features_only=True).eval()
    traced = tiny(name, features_only=True, feature_cls="fx").eval()  # same seed: same weights
    x = sample(name)
    assert traced.feature_info.channels() == eager.feature_info.channels()
    with torch.no_grad():
        maps, ref = traced(x), eager(x)
    assert len(maps) == len(ref) == 4
    for a, b in zip(maps, ref):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------
# full size, on the meta device
# --------------------------------------------------------------------------------------------------

def test_full_size_on_meta_device(name: str) -> None:
    """The registered configuration itself (no shrinking), built without memory: its pyramid and head."""
    cfg = MODEL_CFGS[name]
    with torch.device("meta"):
        model = mvit_zoo.create_model(name)
    assert all(p.is_meta for p in model.parameters())
    # v2 widens in a stage's first attention; v1 (and MViTv2-L) in the MLP of the previous stage's last block
    chs = list(cfg.embed_dim) if cfg.expand_attn else list(cfg.embed_dim[1:] + cfg.embed_dim[-1:])
    assert [i["num_chs"] for i in model.feature_info] == chs
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    assert model.num_features == cfg.embed_dim[-1]
    if model.num_classes:  # detection backbones have no head
        assert model.get_classifier().weight.shape == (model.num_classes, model.num_features)
