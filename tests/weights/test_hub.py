"""Pretrained weights end to end, offline: the fake Hub (tests/hub_server.py) serves weights made from
randomly initialised reference models (timm, torchvision, pytorchvideo, PySlowFast layout); every
loaded model must compute what its reference computes.

Paths covered: timm's Hub repositories (2-D tags, no remapping), this project's Hub organisation
(3-D tags), the official-URL fallback (download -> hash -> torch.load(weights_only) -> convert ->
cached safetensors), a local file; through timm.create_model, mvit_zoo.create_model and
torch.hub.load; caching (no request on the second load, HF_HUB_OFFLINE); downloads (progress, timeouts,
failing fast, concurrent processes, leftovers); the checks of cached files and loaded tensors; and every
error case, each with its own cause and fix.
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

import mvit_zoo
from hub_server import REPO_ROOT, HubServer, hub_endpoint, run_py, silent_server
from mvit_zoo.weights import hub as weights
from mvit_zoo.weights.convert import CheckpointMismatchError, convert_state_dict
from references import (image_input, max_diff, pv_checkpoint, pv_reference, slowfast_checkpoint, timm_reference,
                        tv_reference, video_input)

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-4


def st_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save({k: v.contiguous() for k, v in sd.items()})


def pt_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def ours_bytes(ref: nn.Module, arch: str, kw: dict[str, Any], checkpoint: Any) -> bytes:
    """What `mvit-zoo publish` puts on the Hub: the checkpoint in our layout, as safetensors."""
    model = mvit_zoo.create_model(arch, **kw)
    return st_bytes(convert_state_dict(checkpoint, model))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def converted_files(root: Path) -> list[Path]:
    return sorted((root / "mvit-zoo").glob("*.safetensors"))


def downloads(root: Path) -> list[Path]:
    return sorted((root / "mvit-zoo" / "downloads").glob("*"))


# --------------------------------------------------------------------------------------------------
# 2-D tags: timm's Hub repositories load as they are
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag, repo, cls_token", [
    ("mvit_tiny.fb_in1k", "timm/mvitv2_tiny.fb_in1k", False),
    ("mvit_base_cls.fb_inw21k", "timm/mvitv2_base_cls.fb_inw21k", True),
])
def test_timm_repo_matches_reference_and_is_cached(hub: HubServer, hub_cache: Path, tag: str, repo: str,
                                                   cls_token: bool) -> None:
    ref, _, kw = timm_reference(cls_token)
    assert timm.models.get_pretrained_cfg(tag).hf_hub_id == repo
    hub.add_file(repo, "model.safetensors", st_bytes(ref.state_dict()))  # timm's own keys, unchanged

    model = timm.create_model(tag, pretrained=True, **kw)
    assert max_diff(ref, model, image_input()) < TOL
    assert hub.count("GET", f"/{repo}/resolve/") == 1

    hub.reset_requests()
    again = timm.create_model(tag, pretrained=True, **kw)
    assert hub.requests == []  # the second load is a cache read
    assert same_weights(model, again)

    with hub_endpoint(hub.url, offline=True):  # HF_HUB_OFFLINE=1 with the cache
        offline = mvit_zoo.create_model(tag, pretrained=True, **kw)
    hub.stop()  # and the Hub gone
    gone = timm.create_model(tag, pretrained=True, **kw)
    assert same_weights(model, offline) and same_weights(model, gone)


def test_check_updates_asks_the_hub(hub: HubServer, hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, _, kw = timm_reference(seed=0)
    newer, _, _ = timm_reference(seed=1)
    hub.add_file("timm/mvitv2_tiny.fb_in1k", "model.safetensors", st_bytes(ref.state_dict()))
    timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)
    hub.add_file("timm/mvitv2_tiny.fb_in1k", "model.safetensors", st_bytes(newer.state_dict()))
    cached = timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)
    assert max_diff(ref, cached, image_input()) < TOL
    monkeypatch.setenv("MVIT_ZOO_CHECK_UPDATES", "1")
    updated = timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)
    assert max_diff(newer, updated, image_input()) < TOL
    hub.stop()  # a Hub that cannot be asked leaves the cached copy in use
    assert same_weights(updated, timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw))


# --------------------------------------------------------------------------------------------------
# 3-D tags: this project's organisation on the Hub, else the official checkpoint URL
# --------------------------------------------------------------------------------------------------

def test_project_repo_and_org_override(hub: HubServer, hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tag = "mvit_v2_s_16x4.fb_k400"
    ref, arch, kw = tv_reference(v2=True, seed=0)
    other, _, _ = tv_reference(v2=True, seed=1)
    hub.add_file(f"mvit-zoo/{tag}", "model.safetensors", ours_bytes(ref, arch, kw, ref.state_dict()))
    hub.add_file(f"my-org/{tag}", "model.safetensors", ours_bytes(other, arch, kw, other.state_dict()))
    hub.add_file("someone/else", "model.safetensors", ours_bytes(other, arch, kw, other.state_dict()))

    assert max_diff(ref, timm.create_model(tag, pretrained=True, **kw), video_input()) < TOL
    monkeypatch.setenv("MVIT_ZOO_HUB_ORG", "my-org")  # read at load time, not at import
    assert max_diff(other, timm.create_model(tag, pretrained=True, **kw), video_input()) < TOL
    overlay = dict(hf_hub_id="someone/else")
    assert max_diff(other, timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kw),
                    video_input()) < TOL
    assert hub.count("GET", "/my-org/") == 1 and hub.count("GET", "/someone/else/") == 1


def _tv_pth(ref: nn.Module, prefix: str) -> tuple[str, bytes]:
    """torchvision's file naming: `<name>-<first 8 hex of the SHA-256>.pth`."""
    data = pt_bytes(ref.state_dict())
    return f"{prefix}-{hashlib.sha256(data).hexdigest()[:8]}.pth", data


def _official(kind: str) -> tuple[str, nn.Module, dict[str, Any], str, bytes]:
    """(tag, reference, model kwargs, file name, file bytes) of an official checkpoint in its own format."""
    if kind == "torchvision-v2":
        ref, _, kw = tv_reference(v2=True)
        return ("mvit_v2_s_16x4.tv_k400", ref, kw) + _tv_pth(ref, "mvit_v2_s")
    if kind == "torchvision-v1":
        ref, _, kw = tv_reference(v2=False)
        return ("mvit_b_16x4.tv_k400", ref, kw) + _tv_pth(ref, "mvit_v1_b")
    if kind == "pytorchvideo":
        ref, _, kw = pv_reference()
        kw.pop("pool_norm_eps")  # the .pv_ tag supplies it
        return "mvit_b_16x4.pv_k400", ref, kw, "MVIT_B_16x4.pyth", pt_bytes(pv_checkpoint(ref))
    if kind == "slowfast":
        ref, _, kw = tv_reference(v2=True)
        return ("mvit_v2_s_16x4.fb_k400", ref, kw, "MViTv2_S_16x4_k400_f302660347.pyth",
                pt_bytes(slowfast_checkpoint(ref)))
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["torchvision-v2", "torchvision-v1", "pytorchvideo", "slowfast"])
def test_official_url_fallback(hub: HubServer, hub_cache: Path, kind: str) -> None:
    tag, ref, kw, name, data = _official(kind)
    url = hub.add_static(name, data)
    overlay = dict(url=url)  # the real URL is on dl.fbaipublicfiles.com / download.pytorch.org

    model = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    assert max_diff(ref, model, video_input()) < TOL
    assert hub.requests[0].path == f"/mvit-zoo/{tag}/resolve/main/model.safetensors"  # tried first: missing
    assert hub.count("GET", f"/files/{name}") == 1
    assert len(converted_files(hub_cache)) == 1 and downloads(hub_cache) == []  # converted, raw file gone
    meta = safetensors.safe_open(str(converted_files(hub_cache)[0]), "pt").metadata()
    assert meta["source_url"] == url and meta["source_sha256"] == hashlib.sha256(data).hexdigest()
    if kind == "pytorchvideo":
        assert model.cfg.pool_norm_eps == 1e-5

    hub.reset_requests()
    again = mvit_zoo.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    assert hub.requests == [] and same_weights(model, again)  # a plain safetensors read
    with hub_endpoint(hub.url, offline=True):
        assert same_weights(model, timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kw))


def test_converted_file_is_checked_against_its_recorded_hash(hub: HubServer, hub_cache: Path) -> None:
    tag, ref, kw, name, data = _official("torchvision-v2")
    overlay = dict(url=hub.add_static(name, data))
    model = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    (converted,) = converted_files(hub_cache)
    record = converted.with_name(converted.name + ".sha256")
    assert record.read_text() == f"{weights.sha256_file(converted)}  {converted.name}\n"  # sha256sum -c reads it

    raw = bytearray(converted.read_bytes())
    raw[-3] ^= 0x10  # one flipped bit in a weight: the file still parses
    converted.write_bytes(bytes(raw))
    with pytest.raises(weights.CorruptCheckpointError, match=rf"cached converted weight file "
                                                             rf"{re.escape(str(converted))} of .* changed on disk: .*"
                                                             rf"removed; loading again downloads and converts it"):
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    assert not converted.exists() and not record.exists()
    assert same_weights(model, timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kw))
    record.unlink()
    weights._intact_blobs.clear()  # a new process
    with pytest.raises(weights.CorruptCheckpointError, match="has no SHA-256 recorded beside it"):
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kw)


def test_a_failing_official_url_alone_is_not_called_the_hub(hub: HubServer, hub_cache: Path) -> None:
    tag, ref, kw, name, data = _official("slowfast")
    with silent_server() as silent:  # the Hub answers (no such repository); the official server does not
        url = f"{silent}/files/{name}"
        with pytest.raises(weights.WeightsUnavailableError) as info:
            timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=url), **kw)
    assert info.value.reason == "unreachable" and "cannot reach the Hub" not in str(info.value)
    assert f"{tag}: cannot download the official checkpoint {url}" in str(info.value)


def test_local_file_and_torch_hub(hub: HubServer, hub_cache: Path, tmp_path: Path) -> None:
    tag, ref, kw, name, data = _official("pytorchvideo")
    path = tmp_path / name
    path.write_bytes(data)
    model = mvit_zoo.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)
    assert max_diff(ref, model, video_input()) < TOL
    assert hub.requests == []

    tag, ref, kw, name, data = _official("torchvision-v2")
    url = hub.add_static(name, data)
    loaded = torch.hub.load(str(REPO_ROOT), "mvit_v2_s_16x4", source="local", pretrained="tv_k400",
                            pretrained_cfg_overlay=dict(url=url), **kw)
    assert max_diff(ref, loaded, video_input()) < TOL


def test_image_checkpoint_initialises_video_model(hub: HubServer, hub_cache: Path) -> None:
    ref, _, kw = timm_reference()
    hub.add_file("timm/mvitv2_tiny.fb_in1k", "model.safetensors", st_bytes(ref.state_dict()))
    video = timm.create_model("mvit_v2_s_16x4", depths=(1, 1, 1, 1), embed_dim=16, num_heads=1,
                              img_size=(4, 32, 32), use_cls_token=False, stride_kv_adaptive=(1, 4, 4),
                              num_classes=10)
    weights.load_pretrained(video, timm.models.get_pretrained_cfg("mvit_tiny.fb_in1k"), inflate="center")
    frame = image_input()
    clip = frame.unsqueeze(2).repeat(1, 1, 4, 1, 1)  # a static clip
    with torch.no_grad():
        assert (video.eval()(clip) - ref(frame)).abs().max() < TOL


# --------------------------------------------------------------------------------------------------
# Through a subprocess: HF_ENDPOINT / HF_HUB_OFFLINE from the environment, as users set them
# --------------------------------------------------------------------------------------------------

_LOAD = """
import json, sys, torch, timm, mvit_zoo
out = {}
for item in json.load(open(sys.argv[1])):
    results = []
    for _ in range(2):  # the second load of each model must not touch the network
        model = timm.create_model(item["tag"], pretrained=True, pretrained_cfg_overlay=item["overlay"],
                                  **item["kwargs"]).eval()
        with torch.no_grad():
            results.append((model(torch.load(item["input"])) - torch.load(item["expected"])).abs().max().item())
    out[item["tag"]] = results
print(json.dumps(out))
"""


def test_subprocess_hub_url_cache_offline(hub: HubServer, hf_env: dict[str, str], tmp_path: Path) -> None:
    """HF_ENDPOINT and HF_HUB_OFFLINE as users set them: in the environment, read at import."""
    spec = []
    ref, _, kw = timm_reference()
    hub.add_file("timm/mvitv2_tiny.fb_in1k", "model.safetensors", st_bytes(ref.state_dict()))
    tv_tag, tv_ref, tv_kw, name, data = _official("torchvision-v2")
    url = hub.add_static(name, data)
    for tag, model, kwargs, x, overlay in [("mvit_tiny.fb_in1k", ref, kw, image_input(), {}),
                                           (tv_tag, tv_ref, tv_kw, video_input(), {"url": url})]:
        torch.save(x, tmp_path / f"{tag}.x.pt")
        with torch.no_grad():
            torch.save(model(x), tmp_path / f"{tag}.y.pt")
        spec.append(dict(tag=tag, kwargs=kwargs, overlay=overlay, input=str(tmp_path / f"{tag}.x.pt"),
                         expected=str(tmp_path / f"{tag}.y.pt")))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    code = _LOAD.replace("sys.argv[1]", repr(str(tmp_path / "spec.json")))

    hf_env = {**hf_env, "OMP_NUM_THREADS": "1"}
    online = json.loads(run_py(code, hf_env).stdout)
    assert all(d < TOL for diffs in online.values() for d in diffs), online
    assert [(r.method, r.path) for r in hub.requests] == [  # second loads: no request
        ("HEAD", "/timm/mvitv2_tiny.fb_in1k/resolve/main/model.safetensors"),  # ours: bounded, no retries
        ("HEAD", "/timm/mvitv2_tiny.fb_in1k/resolve/main/model.safetensors"),  # hf_hub_download's
        ("GET", "/timm/mvitv2_tiny.fb_in1k/resolve/main/model.safetensors"),
        ("HEAD", f"/mvit-zoo/{tv_tag}/resolve/main/model.safetensors"),
        ("GET", f"/files/{name}"),
    ]
    hub.reset_requests()
    offline = json.loads(run_py(code, {**hf_env, "HF_HUB_OFFLINE": "1"}).stdout)
    assert offline == online and hub.requests == []


# --------------------------------------------------------------------------------------------------
# Errors: each names the problem and what to do
# --------------------------------------------------------------------------------------------------

def test_offline_without_cache(hub: HubServer, hub_cache: Path) -> None:
    _, _, kw = timm_reference()
    hub.add_file("timm/mvitv2_tiny.fb_in1k", "model.safetensors", b"unused")
    with hub_endpoint(hub.url, offline=True), pytest.raises(weights.WeightsUnavailableError) as info:
        timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message and "pretrained_cfg_overlay=dict(file=" in message
    assert "set HF_ENDPOINT / HF_HUB_OFFLINE" not in message and "unset HF_HUB_OFFLINE to download them" in message
    assert info.value.reason == "offline" and info.value.tag == "mvit_tiny.fb_in1k"
    assert hub.requests == []


@pytest.mark.parametrize("how", ["stopped", "503"])
def test_hub_down_without_cache(hub: HubServer, hub_cache: Path, no_retry_sleep: None, how: str) -> None:
    tag, _, kw, name, data = _official("slowfast")
    url = hub.add_static(name, data)  # the official URL is unreachable too
    if how == "stopped":
        hub.stop()
    else:
        hub.down_status = 503
    with pytest.raises(weights.WeightsUnavailableError) as info:
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=url), **kw)
    message = str(info.value)
    assert "cannot reach the Hub; set HF_ENDPOINT / HF_HUB_OFFLINE or pass a file" in message
    assert hub.url in message and url in message
    assert converted_files(hub_cache) == [] and downloads(hub_cache) == []


def test_unknown_tag_and_no_weights(hub_cache: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'bogus' for mvit_tiny; available: fb_in1k"):
        mvit_zoo.create_model("mvit_tiny.bogus")
    with pytest.raises(RuntimeError, match=r"Invalid pretrained tag \(bogus\) for mvit_tiny"):
        timm.create_model("mvit_tiny.bogus")
    with pytest.raises(ValueError, match=r"unknown mvit-zoo model 'mvit_tinny'; did you mean mvit_tiny"):
        mvit_zoo.create_model("mvit_tinny")
    with pytest.raises(weights.WeightsUnavailableError, match=r"mvit_small_cls has no published weights"):
        mvit_zoo.create_model("mvit_small_cls", pretrained=True, depths=(1, 1, 1, 1), embed_dim=16)


def test_missing_repo_without_url(hub: HubServer, hub_cache: Path) -> None:
    _, _, kw = tv_reference(v2=True)
    with pytest.raises(weights.WeightsUnavailableError) as info:
        timm.create_model("mvit_v2_s_16x4.fb_k400", pretrained=True, pretrained_cfg_overlay=dict(url=None), **kw)
    assert "repository mvit-zoo/mvit_v2_s_16x4.fb_k400 does not exist" in str(info.value)
    assert "no official checkpoint URL" in str(info.value)
    hub.add_repo("mvit-zoo/mvit_v2_s_16x4.fb_k400")
    with pytest.raises(weights.WeightsUnavailableError, match="has no model.safetensors"):
        timm.create_model("mvit_v2_s_16x4.fb_k400", pretrained=True, pretrained_cfg_overlay=dict(url=None), **kw)


def test_wrong_architecture(hub: HubServer, hub_cache: Path, tmp_path: Path) -> None:
    ref, _, kw = tv_reference(v2=True)  # an MViTv2 checkpoint ...
    path = tmp_path / "mvit_v2_s.pth"
    path.write_bytes(pt_bytes(ref.state_dict()))
    with pytest.raises(CheckpointMismatchError) as info:  # ... for an MViT v1 model
        timm.create_model("mvit_b_16x4.tv_k400", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)
    message = str(info.value)
    assert f"weights from {path}" in message and "torchvision layout" in message
    assert "missing keys" in message and "pos_embed_spatial" in message
    assert "unexpected keys" in message and "stages.0.blocks.0.attn.rel_pos_h" in message


def test_shape_mismatch_names_key_and_shapes(hub: HubServer, hub_cache: Path, tmp_path: Path) -> None:
    ref, _, kw = timm_reference()
    sd = ref.state_dict()
    sd["stages.1.blocks.0.mlp.fc1.weight"] = torch.zeros(100, 32)
    hub.add_file("timm/mvitv2_tiny.fb_in1k", "model.safetensors", st_bytes(sd))
    with pytest.raises(CheckpointMismatchError,
                       match=r"stages\.1\.blocks\.0\.mlp\.fc1\.weight: checkpoint \(100, 32\) vs model \(128, 32\)"):
        timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)
    # a classifier of another size is an error unless the model asks for another class count
    _, _, kw = timm_reference()
    kw["num_classes"] = 1000  # the tag's class count, but the file has 10 classes
    overlay = dict(file=str(tmp_path / "w.safetensors"))
    Path(overlay["file"]).write_bytes(st_bytes(ref.state_dict()))
    with pytest.raises(CheckpointMismatchError, match=r"head\.fc\.weight: checkpoint \(10, 128\) vs model \(1000, 128\)"
                                                      r".*pretrained_cfg_overlay=dict\(num_classes=N\)"):
        timm.create_model("mvit_tiny.fb_in1k", pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    model = timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw,  # as the hint says: a new classifier
                              pretrained_cfg_overlay=dict(overlay, num_classes=10))
    assert model.num_classes == 1000
    kw["num_classes"] = 7  # another class count: the classifier is left out, the rest loads
    model = timm.create_model("mvit_tiny.fb_in1k", pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    assert torch.equal(model.stages[0].blocks[0].attn.qkv.weight, ref.stages[0].blocks[0].attn.qkv.weight)


def _hub_blobs(root: Path) -> list[Path]:
    return sorted((root / "hub").glob("models--*/blobs/*"))


def test_corrupt_cached_hub_file_is_removed(hub: HubServer, hub_cache: Path) -> None:
    ref, _, kw = timm_reference()
    hub.add_file("timm/mvitv2_tiny.fb_in1k", "model.safetensors", st_bytes(ref.state_dict()))
    timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)
    (blob,) = _hub_blobs(hub_cache)
    blob.write_bytes(blob.read_bytes()[:1000])  # truncated on disk
    with pytest.raises(weights.CorruptCheckpointError, match="truncated or not a checkpoint.*cached copy was removed"):
        timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)
    assert _hub_blobs(hub_cache) == []
    assert not list((hub_cache / "hub").glob("models--*/snapshots/*/model.safetensors"))
    hub.reset_requests()
    model = timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)  # downloaded afresh
    assert max_diff(ref, model, image_input()) < TOL and hub.count("GET") == 1


def test_hub_download_is_checked_against_its_hash(hub: HubServer, hub_cache: Path) -> None:
    ref, _, kw = timm_reference()
    data = st_bytes(ref.state_dict())
    hub.add_file("timm/mvitv2_tiny.fb_in1k", "model.safetensors", data, corrupt="flip", corrupt_times=1)
    model = timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)  # damaged once: retried
    assert max_diff(ref, model, image_input()) < TOL and hub.count("GET") == 2

    hub.add_file("timm/mvitv2_tiny.fb_in1k", "model.safetensors", data[:-1] + b" ", corrupt="flip")
    with pytest.raises(weights.HashMismatchError, match="does not match the hash.*cache entry was removed"):
        timm.create_model("mvit_tiny.fb_in1k", pretrained=True, pretrained_cfg_overlay=dict(
            hf_hub_id="timm/mvitv2_tiny.fb_in1k@" + hub.commit("timm/mvitv2_tiny.fb_in1k")), **kw)
    assert [b.name for b in _hub_blobs(hub_cache)] == [hashlib.sha256(data).hexdigest()]  # the good one only


def test_hub_download_cut_short(hub: HubServer, hub_cache: Path, no_retry_sleep: None) -> None:
    ref, _, kw = timm_reference()
    hub.add_file("timm/mvitv2_tiny.fb_in1k", "model.safetensors", st_bytes(ref.state_dict()), corrupt="truncate")
    with pytest.raises(weights.CorruptCheckpointError, match="download of timm/mvitv2_tiny.fb_in1k/model.safetensors"
                                                               ".*nothing was cached, try again"):
        timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)
    assert _hub_blobs(hub_cache) == []


def test_url_download_cut_short_or_corrupt(hub: HubServer, hub_cache: Path) -> None:
    tag, ref, kw, name, data = _official("slowfast")
    url = hub.add_static(name, data, corrupt="truncate", corrupt_times=1)
    overlay = dict(url=url)
    with pytest.raises(weights.CorruptCheckpointError, match=f"download of {url} was cut short.*nothing was cached"):
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    assert converted_files(hub_cache) == [] and downloads(hub_cache) == []
    model = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    assert max_diff(ref, model, video_input()) < TOL

    # a corrupt converted file in the cache is removed, then rebuilt from the official file
    (converted,) = converted_files(hub_cache)
    converted.write_bytes(converted.read_bytes()[:500])
    with pytest.raises(weights.CorruptCheckpointError, match="cached copy was removed"):
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kw)
    assert not converted.exists()
    assert same_weights(model, timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay, **kw))

    # an unreadable official file (no published hash): removed, not kept to fail again
    url = hub.add_static("garbage.pyth", bytes(range(256)) * 64)
    with pytest.raises(weights.CorruptCheckpointError,
                       match="garbage.pyth: it is truncated or not a checkpoint") as info:
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=url), **kw)
    assert "weights_only" not in str(info.value)  # torch's advice to load unsafely is never passed on
    assert downloads(hub_cache) == []


def test_hash_mismatch(hub: HubServer, hub_cache: Path) -> None:
    tag, _, kw, name, data = _official("torchvision-v2")
    url = hub.add_static("mvit_v2_s-deadbeef.pth", data)  # torchvision's name carries the hash prefix
    with pytest.raises(weights.HashMismatchError) as info:
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=url), **kw)
    digest = hashlib.sha256(data).hexdigest()
    assert f"has SHA-256 {digest[:16]}..., expected deadbeef..." in str(info.value)
    assert "Nothing was cached" in str(info.value)
    assert converted_files(hub_cache) == [] and downloads(hub_cache) == []

    url = hub.add_static(name, data)  # a hash given by the tag (`file_sha256`)
    with pytest.raises(weights.HashMismatchError, match="expected 0123456789abcdef"):
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=url, file_sha256="0123456789abcdef"),
                          **kw)
    model = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=url, file_sha256=digest), **kw)
    assert model is not None


class NotATensor:
    """An object a weights_only unpickler refuses (it could be anything, and run code on load)."""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (print, ("this would run on torch.load(weights_only=False)",))


def test_unsafe_pickle_is_refused(hub_cache: Path, tmp_path: Path) -> None:
    ref, _, kw = timm_reference()
    path = tmp_path / "evil.pth"
    torch.save({"model_state": ref.state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(weights.UnsafeCheckpointError, match="refused to load .*evil.pth.*could run arbitrary code"):
        timm.create_model("mvit_tiny.fb_in1k", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)
    assert path.exists()  # the user's own file is never deleted


def test_unsafe_official_file_is_refused_and_not_kept(hub: HubServer, hub_cache: Path) -> None:
    ref, _, kw = tv_reference(v2=True)
    url = hub.add_static("MViTv2_S_16x4_k400_f302660347.pyth", pt_bytes({"model_state": ref.state_dict(),
                                                                         "extra": NotATensor()}))
    with pytest.raises(weights.UnsafeCheckpointError, match="refused to load"):
        timm.create_model("mvit_v2_s_16x4.fb_k400", pretrained=True, pretrained_cfg_overlay=dict(url=url), **kw)
    assert downloads(hub_cache) == [] and converted_files(hub_cache) == []


def test_missing_local_file(hub_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained file not found: .*nope.safetensors"):
        timm.create_model("mvit_tiny.fb_in1k", pretrained=True, depths=(1, 1, 1, 1), embed_dim=16,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "nope.safetensors")))


# --------------------------------------------------------------------------------------------------
# Downloads: progress, timeouts, fail fast, concurrency, leftovers, errors per cause
# --------------------------------------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_url_download_shows_progress_on_a_terminal_only(hub: HubServer, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.utils import disable_progress_bars

    # as if HF_HUB_DISABLE_PROGRESS_BARS were unset here (the module's name is shadowed by its tqdm class)
    monkeypatch.setattr(sys.modules["huggingface_hub.utils.tqdm"], "HF_HUB_DISABLE_PROGRESS_BARS", None)
    url = hub.add_static("big.pyth", bytes(3 << 20))
    for stream, disabled, shown in [(_Terminal(), False, True), (io.StringIO(), False, False),
                                    (_Terminal(), True, False)]:
        monkeypatch.setattr(sys, "stderr", stream)
        with disable_progress_bars() if disabled else contextlib.nullcontext():
            weights.download_url(url, tmp_path / "big.pyth")
        out = stream.getvalue()
        assert ("big.pyth: 100%" in out and "3.00M/3.00M" in out) == shown, (disabled, out)


@pytest.mark.timeout(60)
def test_silent_servers_time_out_and_the_url_is_still_tried(hub: HubServer, hub_cache: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    tag, ref, kw, name, data = _official("slowfast")
    good = hub.add_static(name, data)
    monkeypatch.setenv("MVIT_ZOO_DOWNLOAD_TIMEOUT", "0.5")
    with silent_server() as silent, hub_endpoint(silent, cache_dir=hub_cache / "hub", offline=False):
        start = time.monotonic()
        with pytest.raises(weights.WeightsUnavailableError) as info:
            timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=f"{silent}/files/{name}"), **kw)
        elapsed = time.monotonic() - start
        model = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=good), **kw)
    assert elapsed < 10, elapsed  # ~400 s on the Hub path and 60 s per read on the URL path before
    message = str(info.value)
    assert info.value.reason == "unreachable" and message.count("no answer within 0.5 s") == 2, message
    assert "MVIT_ZOO_DOWNLOAD_TIMEOUT" in message
    assert max_diff(ref, model, video_input()) < TOL  # a Hub that times out does not skip the official URL

    monkeypatch.setenv("MVIT_ZOO_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(weights.SettingError, match="MVIT_ZOO_DOWNLOAD_TIMEOUT='soon' is not a number of seconds"):
        weights.download_timeout()


def test_hub_read_timeout_falls_back_to_the_url(hub: HubServer, hub_cache: Path, no_retry_sleep: None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    tag, ref, kw, name, data = _official("slowfast")
    url = hub.add_static(name, data)
    hub.add_file(f"mvit-zoo/{tag}", "model.safetensors", b"never sent in time", delay=3)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.2)
    model = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=url), **kw)
    assert max_diff(ref, model, video_input()) < TOL and hub.count("GET", "/files/") == 1


def test_refused_connection_fails_fast_without_retries(hub: HubServer, hub_cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    tag, _, kw, name, data = _official("slowfast")
    url = hub.add_static(name, data)
    hub.stop()
    with caplog.at_level(logging.INFO), pytest.raises(weights.WeightsUnavailableError) as info:
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=url), **kw)
    assert sleeps == [] and "Retrying" not in caplog.text  # huggingface_hub retried 5 times, ~23 s of back-off
    assert info.value.reason == "unreachable" and "cannot connect" in str(info.value)


def test_cli_hint_names_the_cli_flags(hub: HubServer, hub_cache: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from timm.models import _registry

    from mvit_zoo.apps import cli

    tag = "mvit_tiny.fb_in1k"  # its official URL on the fake Hub too: nothing leaves this machine
    cfg = dataclasses.replace(_registry._model_pretrained_cfgs[tag], url=f"{hub.url}/files/MViTv2_T_in1k.pyth")
    monkeypatch.setitem(_registry._model_pretrained_cfgs, tag, cfg)
    small = dict(depths=[1, 1, 1, 1], embed_dim=16, num_heads=1, img_size=32, num_classes=10)
    argv = ["predict", "--model", "mvit_tiny.fb_in1k", "--model-kwargs", json.dumps(small)]
    hub.stop()
    assert cli.main(argv) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # no retry noise
    assert "cannot reach the Hub" in err and "--checkpoint PATH" in err and "--no-pretrained" in err, err
    assert "pretrained_cfg_overlay" not in err and "HF_ENDPOINT" in err

    with hub_endpoint(hub.url, offline=True):
        assert cli.main(argv) != 0
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE is set" in err and "unset HF_HUB_OFFLINE" in err, err
    assert "HF_HUB_OFFLINE=1" not in err and "HF_ENDPOINT / HF_HUB_OFFLINE" not in err and "pretrained_cfg" not in err


_CONCURRENT = """
import json, os, sys, time
import timm, torch, mvit_zoo
spec = json.load(open(sys.argv[1]))
open(sys.argv[2], "w").close()  # ready
while not os.path.exists(spec["go"]):
    time.sleep(0.01)
model = timm.create_model(spec["tag"], pretrained=True, pretrained_cfg_overlay=dict(url=spec["url"]), **spec["kw"])
print(json.dumps(sorted((k, v.double().sum().item()) for k, v in model.state_dict().items())))
"""


def test_concurrent_cold_loads_through_the_url(hub: HubServer, hf_env: dict[str, str], tmp_path: Path) -> None:
    tag, _, kw, name, data = _official("slowfast")
    url = hub.add_static(name, data, delay=1.0)  # slow enough that every process asks while one downloads
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(dict(tag=tag, url=url, kw=kw, go=str(tmp_path / "go"))))
    env = {**hf_env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    ready = [tmp_path / f"ready{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(spec), str(r)], env=env, cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ready]
    try:
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        (tmp_path / "go").touch()
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    assert len({out for out, _ in results}) == 1  # the same weights everywhere
    assert hub.count("GET", "/files/") == 1  # one process downloaded and converted; the others waited
    cache = Path(hf_env["HF_HOME"]) / "mvit-zoo"
    assert len(list(cache.glob("*.safetensors"))) == 1 and list((cache / "downloads").iterdir()) == []


def test_stale_part_files_are_removed(hub: HubServer, hub_cache: Path) -> None:
    from filelock import FileLock

    tag, _, kw, name, data = _official("slowfast")
    url = hub.add_static(name, data)
    folder = hub_cache / "mvit-zoo" / "downloads"
    folder.mkdir(parents=True)
    parts = {what: folder / f".{file}.k3j4h5g6.part" for what, file in
             [("this", name), ("old", "other.pyth"), ("fresh", "new.pyth"), ("locked", "busy.pyth")]}
    old = time.time() - 2 * weights.STALE_PART_SECONDS
    for what, part in parts.items():
        part.write_bytes(b"part of a download")
        if what in ("old", "locked"):
            os.utime(part, (old, old))
    (hub_cache / "mvit-zoo" / ".locks").mkdir()
    with FileLock(str(hub_cache / "mvit-zoo" / ".locks" / "busy.pyth.lock")):  # another process's download
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=url), **kw)
    assert sorted(p.name for p in folder.iterdir()) == sorted(parts[w].name for w in ("fresh", "locked"))


def test_url_errors_name_their_cause(hub: HubServer, hub_cache: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    tag, _, kw, name, data = _official("slowfast")
    gone = f"{hub.url}/files/{name}"
    with pytest.raises(weights.WeightsUnavailableError) as info:
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=gone), **kw)
    message = str(info.value)
    assert info.value.reason == "missing" and "HTTP 404" in message and "has moved" in message, message
    assert "cannot reach" not in message
    hub.down_status = 500
    with pytest.raises(weights.DownloadError, match="answered HTTP 500") as error:
        weights.download_url(gone, tmp_path / name)
    assert error.value.reason == "http"
    hub.down_status = None

    url = hub.add_static(name, data)
    real_open = open

    class FullDisk(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, chunk: Any) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_disk_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        if str(file).endswith(".part") and "w" in mode:  # a download's temporary file: the disk is full
            f.close()
            return FullDisk()
        return f

    monkeypatch.setattr(builtins, "open", full_disk_open)
    with pytest.raises(weights.CacheError) as cache_error:
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=url), **kw)
    assert cache_error.value.errno == errno.ENOSPC
    assert "No space left on device" in str(cache_error.value) and "MVIT_ZOO_CACHE" in str(cache_error.value)
    assert list((hub_cache / "mvit-zoo" / "downloads").iterdir()) == []


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_hub_cache_write_errors_name_their_cause(hub: HubServer, hub_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                 code: int) -> None:
    from huggingface_hub import file_download

    ref, _, kw = timm_reference()
    hub.add_file("timm/mvitv2_tiny.fb_in1k", "model.safetensors", st_bytes(ref.state_dict()))

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(code, os.strerror(code), str(hub_cache / "hub" / "blobs"))

    monkeypatch.setattr(file_download, "_download_to_tmp_and_move", fail)
    with pytest.raises(weights.CacheError) as info:
        timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)
    assert info.value.errno == code and os.strerror(code) in str(info.value)
    assert "HF_HUB_CACHE" in str(info.value) and "try again" not in str(info.value)


def test_read_only_cache_cleanup_keeps_the_real_error(hub: HubServer, hub_cache: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ref, _, kw = timm_reference()
    hub.add_file("timm/mvitv2_tiny.fb_in1k", "model.safetensors", st_bytes(ref.state_dict()))
    timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)
    (blob,) = _hub_blobs(hub_cache)
    blob.write_bytes(blob.read_bytes()[:1000])

    def read_only(path: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(os, "unlink", read_only)
    with pytest.raises(weights.CorruptCheckpointError,
                       match=r"could not be removed \(Read-only file system\); delete .* by hand"):
        timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)


def test_flipped_bytes_in_a_cached_blob_are_detected(hub: HubServer, hub_cache: Path) -> None:
    ref, _, kw = timm_reference()
    hub.add_file("timm/mvitv2_tiny.fb_in1k", "model.safetensors", st_bytes(ref.state_dict()))
    timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)
    (blob,) = _hub_blobs(hub_cache)
    data = bytearray(blob.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # same length, still a readable safetensors file
    blob.write_bytes(bytes(data))
    with pytest.raises(weights.CorruptCheckpointError,
                       match="does not match the hash it is named by.*cached copy was removed"):
        timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)
    hub.reset_requests()
    model = timm.create_model("mvit_tiny.fb_in1k", pretrained=True, **kw)  # downloaded afresh
    assert max_diff(ref, model, image_input()) < TOL and hub.count("GET") == 1


@pytest.mark.parametrize("bad", ["int64", "bool", "nan", "inf"])
def test_non_float_and_non_finite_weights_are_refused(hub_cache: Path, tmp_path: Path, bad: str) -> None:
    ref, _, kw = timm_reference()
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    key = "stages.1.blocks.0.mlp.fc1.weight"
    if bad == "int64":
        sd[key] = (sd[key] * 100).to(torch.int64)
    elif bad == "bool":
        sd[key] = sd[key] > 0
    else:
        sd[key][3, 4] = float(bad)
    expected = rf"{re.escape(key)} \({bad}\)" if bad in ("int64", "bool") else rf"NaN or Inf .*{re.escape(key)} \(1 of"
    for path, write in [(tmp_path / "w.safetensors", lambda p: p.write_bytes(st_bytes(sd))),
                        (tmp_path / "w.pth", lambda p: torch.save({"model_state": sd}, p))]:
        write(path)
        with pytest.raises(weights.InvalidWeightsError, match=expected):
            timm.create_model("mvit_tiny.fb_in1k", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw)
    with pytest.raises(weights.InvalidWeightsError, match=expected):  # the check convert shares
        weights.check_state_dict(sd)
    weights.check_state_dict(ref.state_dict())


def test_download_without_a_known_hash_warns(hub: HubServer, hub_cache: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    tag, _, kw, name, data = _official("slowfast")
    url = hub.add_static(name, data)
    with caplog.at_level(logging.WARNING, logger="mvit_zoo.weights.hub"):
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=url), **kw)
    assert "has no published SHA-256" in caplog.text and hashlib.sha256(data).hexdigest() in caplog.text
    caplog.clear()
    tag, _, kw, name, data = _official("torchvision-v2")  # checked against its name's SHA-256 prefix
    with caplog.at_level(logging.WARNING, logger="mvit_zoo.weights.hub"):
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=hub.add_static(name, data)), **kw)
    assert "SHA-256" not in caplog.text
    with pytest.raises(ValueError, match="the SHA-256 'xyz' given for .* is not one"):
        timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(url=url + "x", file_sha256="xyz"), **kw)


def test_model_card_lists_the_official_files_without_a_hash() -> None:
    card = (REPO_ROOT / "MODEL_CARD.md").read_text()
    section = card.split("## File hashes", 1)[1].split("\n## ", 1)[0]
    unverified = section.split("Not verified yet", 1)[1]
    for name in mvit_zoo.list_pretrained():
        cfg = timm.models.get_pretrained_cfg(name)
        if not cfg.url:
            continue
        listed = f"`{name}`" in unverified
        assert listed != bool(weights._expected_hash(cfg.url, cfg.file_sha256)), name


# --------------------------------------------------------------------------------------------------
# Full size: the registered tags fit the upstream architectures exactly (pytest -m slow)
# --------------------------------------------------------------------------------------------------

def _full_size(kind: str) -> tuple[str, nn.Module, str, bytes, torch.Tensor]:
    """(tag, randomly initialised upstream model at its published size, file name, file bytes, input)."""
    from references import randomize

    gen = torch.Generator().manual_seed(0)
    clip = torch.randn(1, 3, 16, 224, 224, generator=gen)
    if kind == "timm":
        ref = randomize(timm.create_model("mvitv2_tiny"))
        return ("mvit_tiny.fb_in1k", ref, "", st_bytes(ref.state_dict()),
                torch.randn(1, 3, 224, 224, generator=gen))
    if kind in ("torchvision-v2", "torchvision-v1", "slowfast"):
        from torchvision.models.video import mvit_v1_b, mvit_v2_s

        ref = randomize(mvit_v1_b() if kind == "torchvision-v1" else mvit_v2_s())
        if kind == "slowfast":
            return ("mvit_v2_s_16x4.fb_k400", ref, "MViTv2_S_16x4_k400_f302660347.pyth",
                    pt_bytes(slowfast_checkpoint(ref)), clip)
        tag = "mvit_b_16x4.tv_k400" if kind == "torchvision-v1" else "mvit_v2_s_16x4.tv_k400"
        name, data = _tv_pth(ref, "mvit_v1_b" if kind == "torchvision-v1" else "mvit_v2_s")
        return tag, ref, name, data, clip
    if kind == "pytorchvideo":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pytorchvideo.models.hub.vision_transformers import mvit_base_16x4

        ref = randomize(mvit_base_16x4())
        return "mvit_b_16x4.pv_k400", ref, "MVIT_B_16x4.pyth", pt_bytes(pv_checkpoint(ref)), clip
    raise KeyError(kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["timm", "torchvision-v2", "torchvision-v1", "slowfast", "pytorchvideo"])
def test_full_size_tags_match_upstream(hub: HubServer, hub_cache: Path, kind: str) -> None:
    tag, ref, name, data, x = _full_size(kind)
    overlay: dict[str, Any] = {}
    if name:
        overlay["url"] = hub.add_static(name, data)
    else:
        hub.add_file(timm.models.get_pretrained_cfg(tag).hf_hub_id, "model.safetensors", data)
    model = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay)  # the tag as registered
    assert max_diff(ref, model, x) < TOL
