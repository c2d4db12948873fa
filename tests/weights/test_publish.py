"""`mvit_zoo.weights.publish`: upstream checkpoints -> Hub-ready folders that load back exactly, through
mvit_zoo.create_model, a tag pointing at the Hub, and timm's `hf-hub:` route (config.json)."""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import timm
import torch

import mvit_zoo
from hub_server import HubServer
from mvit_zoo.apps.run_folder import model_config, save_weights
from mvit_zoo.data.config import read_config, write_config
from mvit_zoo.data.transforms import resolve_data_config
from mvit_zoo.weights import convert, publish
from mvit_zoo.weights import hub as weights
from mvit_zoo.weights.convert import convert_state_dict
from references import max_diff, pv_checkpoint, pv_reference, tv_reference, video_input

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-4
TAG = "mvit_b_16x4.pv_k400"
SMALL = dict(depths=(1, 2, 1, 1), embed_dim=16, num_heads=1, img_size=(4, 32, 32))


def publish_hash(monkeypatch: pytest.MonkeyPatch, tag: str, data: bytes) -> None:
    """Give `tag` a published SHA-256: that of `data`, which then is its official file."""
    registered = publish.tag_config
    digest = hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(publish, "tag_config", lambda name: {**registered(name), **({"file_sha256": digest}
                                                                                    if name == tag else {})})


@pytest.fixture(scope="module")
def pv() -> tuple[torch.nn.Module, bytes]:
    ref, _, _ = pv_reference()
    buf = io.BytesIO()
    torch.save(pv_checkpoint(ref), buf)
    return ref, buf.getvalue()


def test_official_tags_are_ours_with_urls() -> None:
    tags = publish.official_tags()
    expected = {n for n in mvit_zoo.list_pretrained()
                if (timm.models.get_pretrained_cfg(n).hf_hub_id or "").startswith("mvit-zoo/")}
    assert set(tags) == expected
    assert {"mvit_v2_s_16x4.fb_k400", "mvit_v2_l_40x3.fb_ssv2", "mvit_b_16x4.tv_k400", TAG} <= set(tags)
    assert not any(t.startswith(("mvit_tiny.", "mvit_base_cls.")) for t in tags)  # timm's repos serve those
    assert sorted(publish.official_tags("mvit_v2_s_*")) == [
        "mvit_v2_s_16x4.fb_k400", "mvit_v2_s_16x4.fb_maskfeat_pt_k400", "mvit_v2_s_16x4.fb_ssv2",
        "mvit_v2_s_16x4.mm_k400", "mvit_v2_s_16x4.mm_maskfeat_k400", "mvit_v2_s_16x4.mm_ssv2", "mvit_v2_s_16x4.tv_k400"]


def test_convert_checkpoint_folder(pv: tuple[torch.nn.Module, bytes], tmp_path: Path, hub_cache: Path) -> None:
    ref, data = pv
    src = tmp_path / "MVIT_B_16x4.pyth"
    src.write_bytes(data)
    folder, report = publish.convert_checkpoint(str(src), TAG, tmp_path / "out", model_args=SMALL)
    assert report.layout == "pytorchvideo" and not report.missing
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    # lossless: exactly the converted tensors, and the same function as the reference
    model = mvit_zoo.create_model("mvit_b_16x4", num_classes=3, pool_norm_eps=1e-5, **SMALL)
    expected = convert_state_dict(pv_checkpoint(ref), model)
    written = safetensors.torch.load_file(str(folder / "model.safetensors"))
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    loaded = mvit_zoo.create_model(TAG, pretrained=True, num_classes=3, **SMALL,
                                   pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors")))
    assert max_diff(ref, loaded, video_input()) < TOL

    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "mvit_b_16x4" and config["num_classes"] == 3
    assert config["num_features"] == 128 and config["global_pool"] == "token"
    assert config["model_args"] == {"pool_norm_eps": 1e-5, "depths": [1, 2, 1, 1], "embed_dim": 16, "num_heads": 1,
                                    "img_size": [4, 32, 32], "num_classes": 3}
    pcfg = config["pretrained_cfg"]
    assert pcfg["mean"] == [0.45, 0.45, 0.45] and pcfg["input_size"] == [3, 32, 32] and pcfg["num_classes"] == 3
    assert set(pcfg) <= {f.name for f in timm.models.PretrainedCfg.__dataclass_fields__.values()}  # timm reads it
    assert config["data_config"]["num_frames"] == 4 and config["data_config"]["sampling_rate"] == 4
    assert "label_names" not in config and "label_set" not in config["data_config"]  # 3 classes: not Kinetics-400

    meta = safetensors.safe_open(str(folder / "model.safetensors"), "pt").metadata()
    assert meta["source_layout"] == "pytorchvideo" and meta["source"] == str(src)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\ntags:\n- video-classification\n- timm\n- mvit-zoo\nlibrary_name: timm\n"
                           "license: apache-2.0\n---\n# Model card for mvit_b_16x4.pv_k400")
    for text in ("PyTorchVideo (facebookresearch/pytorchvideo)", "pytorchvideo layout",
                 "4 frames x 32 x 32, sampling rate 4", "## Citation", "fan2021multiscale",
                 "## Intended use and limitations"):
        assert text in card, text
    # a local file with no published hash is not known to be the tag's official file: no claims about it
    for claim in ("by the paper's authors", "top-1 78.85%", "5 clips x 1 crops"):
        assert claim not in card, claim
    assert "not a verified copy of an official checkpoint of mvit_b_16x4.pv_k400" in card
    assert "timm.create_model('local-dir:path/to/this/folder', pretrained=True)" in card
    assert "create_model('mvit_b_16x4.pv_k400', pretrained=True)" not in card  # would download the official weights


def test_published_folder_loads_from_the_hub(pv: tuple[torch.nn.Module, bytes], tmp_path: Path, hub: HubServer,
                                             hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, data = pv
    src = tmp_path / "MVIT_B_16x4.pyth"
    src.write_bytes(data)
    publish_hash(monkeypatch, TAG, data)
    (folder,) = publish.publish(tmp_path / "out", only=TAG, source_dir=tmp_path, model_args=SMALL, log=lambda m: None)
    assert folder == tmp_path / "out" / TAG
    for name in ("model.safetensors", "config.json", "README.md"):
        hub.add_file(f"mvit-zoo/{TAG}", name, folder / name)

    card = (folder / "README.md").read_text()  # publish converts the tag's official file: its claims hold
    for text in ("PyTorchVideo (facebookresearch/pytorchvideo)", "pytorchvideo layout", "top-1 78.85%",
                 "5 clips x 1 crops", "by the paper's authors", "create_model('mvit_b_16x4.pv_k400', pretrained=True)"):
        assert text in card, text

    via_tag = timm.create_model(TAG, pretrained=True, num_classes=3, **SMALL)
    assert max_diff(ref, via_tag, video_input()) < TOL
    via_config = timm.create_model(f"hf-hub:mvit-zoo/{TAG}", pretrained=True)  # architecture from config.json
    assert via_config.cfg.pool_norm_eps == 1e-5 and via_config.num_classes == 3
    assert max_diff(ref, via_config, video_input()) < TOL


def test_publish_checks_known_hashes(tmp_path: Path, hub_cache: Path) -> None:
    ref, _, _ = tv_reference(False)
    url = timm.models.get_pretrained_cfg("mvit_b_16x4.tv_k400").url
    (tmp_path / url.rsplit("/", 1)[-1]).write_bytes(b"not the published file")
    with pytest.raises(weights.HashMismatchError, match="expected dbeb1030"):
        publish.publish(tmp_path / "out", only="mvit_b_16x4.tv_k400", source_dir=tmp_path, log=lambda m: None)
    assert not (tmp_path / "out" / "mvit_b_16x4.tv_k400" / "model.safetensors").exists()


def test_push(pv: tuple[torch.nn.Module, bytes], tmp_path: Path, hub_cache: Path,
              monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    ref, data = pv
    (tmp_path / "MVIT_B_16x4.pyth").write_bytes(data)
    publish_hash(monkeypatch, TAG, data)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(weights.WeightsError, match="--push needs a Hugging Face token .* HF_TOKEN"):
        publish.publish(tmp_path / "out", only=TAG, source_dir=tmp_path, push=True, log=lambda m: None)
    assert not (tmp_path / "out").exists()  # nothing converted before failing

    calls: list[tuple[str, Any]] = []

    class FakeApi:
        def __init__(self, token: str | None = None) -> None:
            calls.append(("token", token))

        def create_repo(self, repo_id: str, **kw: Any) -> None:
            calls.append(("create_repo", repo_id))

        def upload_folder(self, repo_id: str, folder_path: str, **kw: Any) -> Any:
            calls.append(("upload_folder", (repo_id, sorted(p.name for p in Path(folder_path).iterdir()))))
            return type("CommitInfo", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("MVIT_ZOO_HUB_ORG", "my-org")
    logs: list[str] = []
    publish.publish(tmp_path / "out", only=TAG, source_dir=tmp_path, push=True, token="hf_x", model_args=SMALL,
                    log=logs.append)
    assert calls == [("token", "hf_x"), ("create_repo", f"my-org/{TAG}"),
                     ("upload_folder", (f"my-org/{TAG}", ["README.md", "config.json", "model.safetensors"]))]
    assert logs[-1] == f"{TAG}: pushed to my-org/{TAG}: https://hub/my-org/{TAG}/commit/1"


def test_converted_folder_loads_as_its_card_says(pv: tuple[torch.nn.Module, bytes], tmp_path: Path,
                                                 hub_cache: Path) -> None:
    """Without a tag: the model is built from the checkpoint (pytorchvideo's pool-norm eps in
    config.json) and the card's snippet loads this folder."""
    ref, data = pv
    src = tmp_path / "model.pyth"
    src.write_bytes(data)
    small = {k: v for k, v in SMALL.items() if k != "img_size"}  # the input size comes from the tables
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder, _ = publish.convert_checkpoint(str(src), "mvit_b_16x4", tmp_path / "out", model_args=small)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_args"]["pool_norm_eps"] == 1e-5 and config["model_args"]["img_size"] == [4, 32, 32]
    assert config["source"] == {"file": str(src), "sha256": weights.sha256_file(src), "layout": "pytorchvideo",
                                "description": "converted by mvit-zoo convert"}
    card = (folder / "README.md").read_text()
    assert "timm.create_model('local-dir:path/to/this/folder', pretrained=True)" in card
    assert "by the paper's authors" not in card and "Published accuracy" not in card
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert max_diff(ref, model, video_input()) < 1e-5

    with pytest.warns(convert.ArchitectureMismatchWarning, match=r"pool_norm_eps: the pytorchvideo checkpoint "
                                                                 r"implies 1e-05, the model has 1e-06"):
        publish.convert_checkpoint(str(src), "mvit_b_16x4", tmp_path / "stated", model_args={**small,
                                                                                             "pool_norm_eps": 1e-6})


def test_finetuned_checkpoint_keeps_its_size_and_labels(tmp_path: Path, hub_cache: Path) -> None:
    """A 64 px fine-tuned folder converted without restating img_size: no resizing, its labels kept; a
    bare weights file (no config.json) still gets the size its tables were made for."""
    kw = {"depths": (1, 1, 1, 1), "embed_dim": 16, "num_heads": 1}
    model = mvit_zoo.create_model("mvit_tiny.fb_in1k", img_size=64, num_classes=3, **kw).eval()
    run = tmp_path / "run"
    write_config(run, model_config(model, "mvit_tiny.fb_in1k", ["cat", "dog", "owl"],
                                            {**kw, "img_size": 64, "num_classes": 3},
                                            resolve_data_config(model)))
    save_weights(run / "model.safetensors", model, 1)
    x = torch.randn(1, 3, 64, 64)

    folder, report = publish.convert_checkpoint(str(run / "model.safetensors"), "mvit_tiny", tmp_path / "out",
                                                model_args=kw)
    assert not report.resized
    config = read_config(folder)
    assert config.label_names == ("cat", "dog", "owl") and config.model_args["img_size"] == 64  # the run's own
    assert config.pretrained_cfg["input_size"] == [3, 64, 64]
    card = (folder / "README.md").read_text()
    assert "weights are unchanged" in card and "fine-tuned from mvit_tiny.fb_in1k" in card
    assert "create_model('mvit_tiny" not in card
    converted = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=0, atol=0)

    bare = tmp_path / "bare" / "weights.safetensors"
    bare.parent.mkdir()
    bare.write_bytes((run / "model.safetensors").read_bytes())
    folder, report = publish.convert_checkpoint(str(bare), "mvit_tiny", tmp_path / "out2", model_args=kw)
    assert not report.resized and read_config(folder).model_args["img_size"] == [64, 64]
    folder, report = publish.convert_checkpoint(str(bare), "mvit_tiny", tmp_path / "out3",
                                                model_args={**kw, "img_size": 96})  # asked for: resized, and said
    assert report.resized and "Conversion changed the weights: resized" in (folder / "README.md").read_text()


@pytest.mark.parametrize("bad, message", [
    (float("nan"), r"NaN or Inf values in 1 tensor\(s\): norm\.weight \(1 of 128\)"),
    ("int", r"not floating point: norm\.weight \(int64\)"),
])
def test_unusable_tensors_are_refused_and_nothing_is_left(bad: Any, message: str, tmp_path: Path,
                                                          hub_cache: Path) -> None:
    ref, _, kw = tv_reference(v2=True)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    if bad == "int":
        sd["norm.weight"] = sd["norm.weight"].round().long()
    else:
        sd["norm.weight"][0] = bad
    src = tmp_path / "src" / "mvit_v2_s.pth"
    src.parent.mkdir()
    torch.save(sd, src)
    with pytest.raises(weights.InvalidWeightsError, match=message):
        publish.convert_checkpoint(str(src), "mvit_v2_s_16x4", tmp_path / "out", model_args=kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no folder, no stray file


def test_a_failed_write_leaves_the_previous_folder(tmp_path: Path, hub_cache: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ref, _, kw = tv_reference(v2=True)
    src = tmp_path / "mvit_v2_s.pth"
    torch.save(ref.state_dict(), src)
    folder, _ = publish.convert_checkpoint(str(src), "mvit_v2_s_16x4", tmp_path / "out", model_args=kw)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(publish, "write_config", broken)
    with pytest.raises(OSError, match="No space left"):
        publish.convert_checkpoint(str(src), "mvit_v2_s_16x4", tmp_path / "out", overwrite=True,
                                   model_args={**kw, "num_classes": 3, "drop_rate": 0.5})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mvit_v2_s.pth", "out"]
