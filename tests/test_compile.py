"""torch.compile captures the whole model in one graph (fullgraph=True raises on any graph break),
2D and 3D, at several input sizes with dynamic shapes."""
from __future__ import annotations

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
