"""Export: torch.export and ONNX (dynamo exporter, run by onnxruntime) for one 2D and one 3D model.

Each model is exported once per module with a dynamic batch axis; the programs are then run on
fresh inputs (other values, another batch size) and compared with eager PyTorch. The video model
is exported at a clip size where a joint (query x key) relative-position index, the cause of
torchvision's ONNX memory blow-up (pytorch/vision#7003), would be far larger than any weight.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import mvit_zoo


def _onnx_modules() -> tuple[Any, Any]:
    """onnx and onnxruntime (and onnxscript, which the dynamo exporter needs); else skips the calling test only."""
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnx"), pytest.importorskip("onnxruntime")


ATOL = 1e-4
# Two stages keep the exports fast (about half the graph of four) and hold every op the model uses:
# stage 0 (no Q stride, one head) and a stage transition (Q stride, channel growth, two heads).
SMALL: dict[str, Any] = dict(depths=(1, 1), embed_dim=16, num_heads=1)


@dataclass
class Exported:
    model: nn.Module
    shape: tuple[int, ...]  # input shape traced (batch 2)
    program: torch.export.ExportedProgram


CASES: dict[str, tuple[str, dict[str, Any], tuple[int, ...]]] = {
    # 2D MViTv2 (no class token) and 3D MViTv2 (class token, temporal relative positions)
    "image": ("mvit_tiny", dict(img_size=32, num_classes=10), (2, 3, 48, 64)),
    "video": ("mvit_v2_s_16x4", dict(img_size=(4, 32, 32), num_classes=3), (2, 3, 8, 112, 112)),
}


def _inputs(shape: tuple[int, ...], batch: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch,) + shape[1:], generator=g)


def _eager(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models: one torch thread is many times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(CASES))
def exported(request: pytest.FixtureRequest, one_torch_thread: None) -> Exported:
    name, kwargs, shape = CASES[request.param]
    torch.manual_seed(0)
    model = mvit_zoo.create_model(name, **SMALL, **kwargs).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (_inputs(shape, 2, 0),), dynamic_shapes={"x": {0: batch}})
    return Exported(model, shape, program)


def test_torch_export_matches_eager_on_new_inputs(exported: Exported) -> None:
    module = exported.program.module()
    for batch, seed in ((3, 1), (1, 2)):
        x = _inputs(exported.shape, batch, seed)
        out = module(x)
        assert out.shape == (batch, exported.model.num_classes)
        torch.testing.assert_close(out, _eager(exported.model, x), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_torch_export_save_load_round_trip(exported: Exported, tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    torch.export.save(exported.program, path)
    loaded = torch.export.load(path).module()
    x = _inputs(exported.shape, 3, 4)
    torch.testing.assert_close(loaded(x), _eager(exported.model, x), atol=ATOL, rtol=0)


def test_onnx_round_trip_with_onnxruntime(exported: Exported, tmp_path: Path) -> None:
    onnx, ort = _onnx_modules()
    path = tmp_path / "model.onnx"
    program = torch.onnx.export(exported.program, dynamo=True, verbose=False)
    assert program is not None
    program.save(str(path))
    model_proto = onnx.load(str(path))
    onnx.checker.check_model(model_proto)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (input_meta,) = session.get_inputs()
    for batch, seed in ((2, 5), (3, 6)):
        x = _inputs(exported.shape, batch, seed)
        (out,) = session.run(None, {input_meta.name: x.numpy()})
        ref = _eager(exported.model, x).numpy()
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)

    # no blow-up: nothing in the graph is bigger than the biggest weight, and the file is about the
    # size of the weights (a joint relative-position index at this clip size would be >= 200k entries)
    biggest_param = max(p.numel() for p in exported.model.parameters())
    constants = [int(np.prod(t.dims)) for t in model_proto.graph.initializer]
    constants += [int(np.prod(a.t.dims)) for n in model_proto.graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    assert max(constants) <= biggest_param, (max(constants), biggest_param)
    param_bytes = sum(p.numel() * p.element_size() for p in exported.model.parameters())
    assert os.path.getsize(path) < 2 * param_bytes + (1 << 20)


@pytest.mark.slow
def test_onnx_export_full_size_video_clip_stays_small(tmp_path: Path) -> None:
    """mvit_v2_s_16x4 at its full 16x224x224 clip: export in bounded memory, onnxruntime agrees."""
    _, ort = _onnx_modules()
    import resource

    torch.manual_seed(0)
    model = mvit_zoo.create_model("mvit_v2_s_16x4").eval()
    x = torch.randn(1, 3, 16, 224, 224)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    path = tmp_path / "mvit_v2_s.onnx"
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    assert program is not None
    program.save(str(path))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 4096, f"export raised peak memory by {grown_mib:.0f} MiB"
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert os.path.getsize(path) < 1.5 * param_bytes
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out, _eager(model, x).numpy(), atol=ATOL, rtol=0)
