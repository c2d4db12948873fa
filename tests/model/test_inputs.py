"""Hard edges at the model's entry: one clear error per malformed input; determinism; threads.

Every bad input is rejected by `MViT.check_input` before any layer runs, with a message that names
the problem and the fix. The NaN/Inf check is opt-in (`model.check_finite = True`): it costs a full
pass over the input, so it is off by default.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import mvit_zoo
from mvit_zoo.model.mvit import MViT

SMALL: dict[str, Any] = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1)

# tiny models: one torch thread is many times faster than two on a busy 2-core machine (conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def image_model() -> MViT:
    torch.manual_seed(0)
    return mvit_zoo.create_model("mvit_tiny", img_size=32, num_classes=10, **SMALL).eval()


@pytest.fixture(scope="module")
def video_model() -> MViT:
    torch.manual_seed(0)
    return mvit_zoo.create_model("mvit_v2_s_16x4", img_size=(4, 32, 32), num_classes=3, **SMALL).eval()


def _entry_points(model: MViT) -> list[Callable[[Tensor], object]]:
    """Every way in: forward, forward_features, forward_intermediates."""
    return [model, model.forward_features, model.forward_intermediates]


def _rejects(model: MViT, x: object, error: type[Exception], *fragments: str) -> str:
    """Each entry point raises `error` whose message holds every fragment; returns the message."""
    message = ""
    for call in _entry_points(model):
        with pytest.raises(error) as info, torch.no_grad():
            call(x)  # type: ignore[arg-type]
        message = str(info.value)
        for fragment in fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ------------------------------------------------------------------------------------------------
# One clear error per malformed input
# ------------------------------------------------------------------------------------------------

def test_image_to_video_model_says_add_a_time_axis(video_model: MViT) -> None:
    message = _rejects(video_model, torch.randn(2, 3, 32, 32), ValueError, "video model", "(B, C, T, H, W)",
                       "time axis")
    assert "4-D" in message


def test_single_image_with_a_time_axis_is_accepted(video_model: MViT) -> None:
    """Following the hint for a single image (x.unsqueeze(2)) must give a working input, not a second error."""
    with torch.no_grad():
        out = video_model(torch.randn(2, 3, 32, 32).unsqueeze(2))
    assert out.shape == (2, 3)


def test_video_to_image_model(image_model: MViT) -> None:
    _rejects(image_model, torch.randn(1, 3, 4, 32, 32), ValueError, "image model", "(B, C, H, W)", "5-D")


def test_missing_batch_axis(image_model: MViT, video_model: MViT) -> None:
    _rejects(image_model, torch.randn(3, 32, 32), ValueError, "4-D", "(B, C, H, W)", "3-D", "unsqueeze(0)")
    _rejects(video_model, torch.randn(3, 4, 32, 32), ValueError, "(B, C, T, H, W)")


def test_wrong_channel_count(image_model: MViT, video_model: MViT) -> None:
    _rejects(image_model, torch.randn(1, 1, 32, 32), ValueError, "expected 3 input channels", "got 1", "in_chans=1")
    # the common (B, T, C, H, W) video layout gets the permute hint
    _rejects(video_model, torch.randn(1, 4, 3, 32, 32), ValueError, "expected 3 input channels", "got 4", "permute")


def test_channels_last_input_says_permute(image_model: MViT, video_model: MViT) -> None:
    """An NHWC image (as PIL/numpy give it) is named channels-last with the permute, not 'in_chans=32'."""
    message = _rejects(image_model, torch.randn(1, 32, 32, 3), ValueError, "channels-last (B, H, W, C)",
                       "x.permute(0, 3, 1, 2)")
    assert "in_chans" not in message
    _rejects(video_model, torch.randn(1, 4, 32, 32, 3), ValueError, "channels-last (B, T, H, W, C)",
             "x.permute(0, 4, 1, 2, 3)")


def test_too_small_states_the_minimum(image_model: MViT, video_model: MViT) -> None:
    assert image_model.min_input_size == (32, 32)
    assert video_model.min_input_size[1:] == (32, 32)
    _rejects(image_model, torch.randn(1, 3, 16, 40), ValueError, "too small", "H=16 (min 32)")
    _rejects(image_model, torch.randn(1, 3, 40, 31), ValueError, "W=31 (min 32)")
    _rejects(video_model, torch.randn(1, 3, 4, 32, 8), ValueError, "W=8 (min 32)")
    with torch.no_grad():  # the minimum itself is accepted
        assert image_model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
        assert video_model(torch.randn((1, 3) + video_model.min_input_size)).shape == (1, 3)


def test_too_few_frames_states_the_minimum(video_model: MViT) -> None:
    min_frames = video_model.min_input_size[0]
    _rejects(video_model, torch.randn(1, 3, min_frames - 1, 32, 32), ValueError, "too small",
             f"T={min_frames - 1} (min {min_frames})")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_non_float_dtype(image_model: MViT, dtype: torch.dtype) -> None:
    x = torch.zeros(1, 3, 32, 32, dtype=dtype)
    _rejects(image_model, x, TypeError, "floating-point", str(dtype), ".float()", "mean")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_float_dtype_other_than_the_weights(image_model: MViT, dtype: torch.dtype) -> None:
    """A float16/float64 input to a float32 model: a clear TypeError, not conv's RuntimeError."""
    _rejects(image_model, torch.randn(1, 3, 32, 32, dtype=dtype), TypeError, str(dtype), "torch.float32",
             "model.to(")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # under autocast it is the point
        assert image_model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).shape == (1, 10)


def test_empty_batch(image_model: MViT, video_model: MViT) -> None:
    _rejects(image_model, torch.randn(0, 3, 32, 32), ValueError, "batch size 0")
    _rejects(video_model, torch.randn(0, 3, 4, 32, 32), ValueError, "batch size 0")


def test_not_a_tensor(image_model: MViT) -> None:
    _rejects(image_model, np.zeros((1, 3, 32, 32), dtype=np.float32), TypeError, "torch.Tensor", "ndarray")


def test_features_only_model_checks_too() -> None:
    backbone = mvit_zoo.create_model("mvit_tiny", img_size=32, features_only=True, **SMALL)
    with pytest.raises(ValueError, match="expected 3 input channels"):
        backbone(torch.randn(1, 4, 32, 32))


@pytest.fixture
def finite_checks(image_model: MViT) -> Iterator[MViT]:
    image_model.check_finite = True
    try:
        yield image_model
    finally:
        image_model.check_finite = False


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_rejected_when_enabled(finite_checks: MViT, bad: float) -> None:
    x = torch.randn(2, 3, 32, 32)
    x[1, 2, 5, 7] = bad
    _rejects(finite_checks, x, ValueError, "NaN", "Inf", "check_finite")
    with torch.no_grad():  # finite input still passes
        assert finite_checks(torch.randn(2, 3, 32, 32)).isfinite().all()


def test_nan_check_is_off_by_default(image_model: MViT) -> None:
    assert image_model.check_finite is False
    x = torch.randn(1, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        assert image_model(x).isnan().any()  # passes straight through: no cost unless asked for


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def deterministic() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def _video_at_other_size() -> Tensor:
    """Not the build size: the relative-position tables and time embedding are interpolated."""
    return torch.randn(2, 3, 6, 48, 40, generator=torch.Generator().manual_seed(0))


def test_same_input_same_output_across_runs_and_builds(video_model: MViT) -> None:
    x = _video_at_other_size()
    with torch.no_grad():
        first = video_model(x)
        assert torch.equal(video_model(x), first)
    torch.manual_seed(0)
    rebuilt = mvit_zoo.create_model("mvit_v2_s_16x4", img_size=(4, 32, 32), num_classes=3, **SMALL).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), first)


@pytest.mark.parametrize("name,kwargs", [
    ("mvit_v2_s_16x4", dict(img_size=(4, 32, 32), num_classes=3)),
    ("mvit_b_16x4", dict(img_size=(4, 32, 32), num_classes=3)),  # v1: interpolated absolute positions
])
def test_deterministic_algorithms_forward_and_backward(deterministic: None, name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = mvit_zoo.create_model(name, **SMALL, **kwargs)
    x = _video_at_other_size()
    results = []
    for _ in range(2):
        model.zero_grad()
        model.eval()  # no dropout: deterministic algorithms, not RNG, are under test
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert len(grads_a) == len(grads_b) == sum(1 for p in model.parameters() if p.requires_grad)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)
    torch.use_deterministic_algorithms(False)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out_a, atol=1e-5, rtol=1e-5)


def _set_weights(model: MViT, state: dict[str, Tensor], how: str) -> None:
    """Put `state` into `model` the way users and libraries do."""
    params = dict(model.named_parameters())
    if how == "load_state_dict":
        model.load_state_dict(state)
    elif how == "data_copy":  # EMA / init code: in place through .data (no version bump)
        for k, p in params.items():
            p.data.copy_(state[k])
    elif how == "data_assign":  # new storage, same Parameter object
        for k, p in params.items():
            p.data = state[k].clone()
    elif how == "vector_to_parameters":
        torch.nn.utils.vector_to_parameters(torch.cat([state[k].flatten() for k in params]), params.values())
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["load_state_dict", "data_copy", "data_assign", "vector_to_parameters"])
def test_inference_never_uses_stale_weights(how: str) -> None:
    """Any cache of looked-up or interpolated tables follows weight updates, however they are made."""
    kwargs = dict(img_size=(4, 32, 32), num_classes=3, **SMALL)
    torch.manual_seed(0)
    model = mvit_zoo.create_model("mvit_v2_s_16x4", **kwargs).eval()
    torch.manual_seed(1)
    other = mvit_zoo.create_model("mvit_v2_s_16x4", **kwargs).eval()
    for name, p in other.named_parameters():
        if "rel_pos" in name:  # make the relative positions matter
            p.data.normal_(0.0, 3.0)
    x = _video_at_other_size()
    with torch.no_grad():
        before = model(x)
        _set_weights(model, {k: v.detach().clone() for k, v in other.state_dict().items()}, how)
        after, expected = model(x), other(x)
    assert not torch.equal(before, expected)
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Several threads at once
# ------------------------------------------------------------------------------------------------

def _snapshot(model: MViT) -> tuple[dict[str, Tensor], list[set[str]]]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [set(vars(m)) | set(m._buffers) for m in model.modules()])


def test_concurrent_inference_in_threads(video_model: MViT) -> None:
    """Threads running one model on inputs of different sizes (different interpolated tables) at once
    get exactly what each gets alone, and the model is unchanged afterwards."""
    shapes = [(1, 3, 4, 32, 32), (2, 3, 6, 48, 40), (1, 3, 8, 64, 32), (2, 3, 2, 32, 96)]
    inputs = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    with torch.no_grad():
        expected = [video_model(x) for x in inputs]
    before = _snapshot(video_model)

    barrier = threading.Barrier(len(inputs))

    def run(i: int) -> list[Tensor]:
        barrier.wait()
        with torch.no_grad():
            return [video_model(inputs[(i + r) % len(inputs)]) for r in range(len(inputs))]

    with ThreadPoolExecutor(len(inputs)) as pool:
        outputs = list(pool.map(run, range(len(inputs))))
    for i, outs in enumerate(outputs):
        for r, out in enumerate(outs):
            torch.testing.assert_close(out, expected[(i + r) % len(inputs)], atol=1e-6, rtol=1e-6)

    after = _snapshot(video_model)
    assert after[1] == before[1], "forward added attributes or buffers (shared mutable state)"
    for k, v in before[0].items():
        assert torch.equal(after[0][k], v), k


@pytest.mark.parametrize("name,shape", [("mvit_small_cls", (2, 3, 224, 224)), ("mvit_v2_s_16x4", (1, 3, 16, 224, 224))])
def test_meta_device_forward_and_backward(name: str, shape: tuple[int, ...]) -> None:
    """Full-size models on the meta device (shape inference, deferred init) run forward and backward with
    autograd on, in training mode too (the memory-saving path takes the plain ops there)."""
    with torch.device("meta"):
        model = mvit_zoo.create_model(name).train()
        x = torch.randn(shape, requires_grad=True)
    out = model(x)
    assert out.shape == (shape[0], model.num_classes) and out.device.type == "meta"
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
