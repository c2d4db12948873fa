"""torch.compile captures the whole model in one graph (fullgraph=True raises on any graph break),
2D and 3D, at several input sizes with dynamic shapes."""
from __future__ import annotations

import warnings

import pytest
import torch

import mvit_zoo

SMALL = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1)
CASES = [
    ("mvit_small_cls", [(2, 3, 32, 32), (1, 3, 48, 64)]),  # v2, class token, non-square second size
    ("mvit_v2_s_16x4", [(1, 3, 4, 32, 32), (2, 3, 6, 40, 48)]),  # v2 video, temporal rel-pos
    ("mvit_b_16x4", [(1, 3, 4, 32, 32), (1, 3, 8, 32, 40)]),  # v1 video, separable abs pos
]


def _check(name: str, shapes: list[tuple[int, ...]], backend: str) -> None:
    torch._dynamo.reset()
    model = mvit_zoo.create_model(name, img_size=shapes[0][2:], **SMALL).eval()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    for shape in shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            assert (compiled(x) - model(x)).abs().max() < 1e-4, shape


@pytest.mark.parametrize("name,shapes", CASES, ids=[c[0] for c in CASES])
def test_fullgraph_capture(name: str, shapes: list[tuple[int, ...]]) -> None:
    """Dynamo traces forward without a break ('eager' backend: the capture, without code generation)."""
    _check(name, shapes, "eager")


@pytest.mark.slow
@pytest.mark.parametrize("name,shapes", CASES, ids=[c[0] for c in CASES])
def test_inductor(name: str, shapes: list[tuple[int, ...]]) -> None:
    _check(name, shapes, "inductor")


def test_training_step_compiles() -> None:
    model = mvit_zoo.create_model("mvit_small_cls", img_size=32, num_classes=3, **SMALL)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    torch.nn.functional.cross_entropy(compiled(x), y).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# -- TorchScript (timm's mvitv2 scripts, so ours must too) ---------------------------------------

SCRIPT_CASES = [
    ("mvit_small_cls", {}, [(2, 3, 32, 32), (1, 3, 48, 64)]),
    ("mvit_tiny", {"pool_mode": "max"}, [(1, 3, 32, 32)]),  # max pooling, no pool norm
    ("mvit_v1_b_16", {}, [(1, 3, 32, 32), (1, 3, 64, 32)]),  # v1 image, separable abs pos resized
    ("mvit_v2_s_16x4", {}, [(1, 3, 4, 32, 32), (1, 3, 6, 40, 48)]),
    ("mvit_b_16x4", {}, [(1, 3, 4, 32, 32)]),
]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated in torch 2.14
@pytest.mark.parametrize("name,overrides,shapes", SCRIPT_CASES,
                         ids=[c[0] + "-" + str(i) for i, c in enumerate(SCRIPT_CASES)])
def test_torchscript_matches_eager_and_round_trips(name: str, overrides: dict, shapes: list, tmp_path) -> None:
    model = mvit_zoo.create_model(name, img_size=shapes[0][2:], **SMALL, **overrides).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        scripted = torch.jit.script(model)
    assert not [w for w in caught if issubclass(w.category, UserWarning)], "scripting warns"
    path = tmp_path / "model.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape)
            ref = model(x)
            assert (scripted(x) - ref).abs().max() < 1e-5, shape
            assert (loaded(x) - ref).abs().max() < 1e-5, shape
    bad = torch.randn((shapes[0][0], 4) + shapes[0][2:])
    with pytest.raises(Exception, match="input channels"):
        loaded(bad)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_timm_reference_scripts_too() -> None:
    """The condition under which scripting is required: timm's own mvitv2 scripts in this torch."""
    timm = pytest.importorskip("timm")
    ref = timm.create_model("mvitv2_tiny").eval()
    torch.jit.script(ref)
