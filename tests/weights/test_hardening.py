"""Weight files and converted folders that must be refused or handled whole: outputs convert may not
replace, folders swapped in whole, small files that would allocate gigabytes, training states that ask
to run code, files offered as official that no hash confirms, and the messages of environment problems."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import mvit_zoo
from mvit_zoo.apps import cli
from mvit_zoo.data.config import config_for_model, write_config
from mvit_zoo.model import registry
from mvit_zoo.weights import hub, publish
from mvit_zoo.weights.convert import CheckpointMismatchError, convert_state_dict
from references import tv_reference

pytestmark = pytest.mark.usefixtures("single_thread")
KW: dict[str, Any] = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1, img_size=32)


def _tiny(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return mvit_zoo.create_model("mvit_tiny", num_classes=num_classes, **KW)


def _run_folder(tmp_path: Path, model_args: dict[str, Any] | None = None) -> Path:
    """A `mvit-zoo finetune`-style folder: model.safetensors + config.json naming the architecture."""
    model = _tiny()
    run = tmp_path / "run"
    args = {**KW, "num_classes": 3, **(model_args or {})}
    write_config(run, config_for_model(model, model_args=args, pretrained_cfg=dict(model.pretrained_cfg),
                                       data_config={}, label_names=["a", "b", "c"]))
    hub.save_safetensors(model.state_dict(), run / "model.safetensors")
    return run


def _convert(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["convert", *args])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The output of convert
# ------------------------------------------------------------------------------------------------

def test_output_that_is_a_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_folder(tmp_path)
    (tmp_path / "taken").write_text("mine")
    code, err = _convert(capsys, str(run), "--output", str(tmp_path / "taken"))
    assert code != 0 and "Traceback" not in err
    assert f"the output {tmp_path / 'taken'} cannot be a folder: {tmp_path / 'taken'} is a file" in err
    assert (tmp_path / "taken").read_text() == "mine"


def test_model_comes_from_the_folders_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_folder(tmp_path)
    code, err = _convert(capsys, str(run), "--output", str(tmp_path / "out"))
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architecture"] == "mvit_tiny"
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "w.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    code, err = _convert(capsys, str(tmp_path / "bare" / "w.safetensors"), "--output", str(tmp_path / "out2"))
    assert code != 0 and "no config.json beside it names the architecture; pass --model NAME" in err


def test_existing_folder_needs_overwrite_and_must_be_converts(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_folder(tmp_path)
    out = tmp_path / "out"
    assert _convert(capsys, str(run), "--output", str(out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = _convert(capsys, str(run), "--output", str(out), "--model-arg", "drop_rate=0.5")
    assert code != 0 and "already exists; pass --overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, err = _convert(capsys, str(run), "--output", str(out), "--model-arg", "drop_rate=0.5", "--overwrite")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["model_args"]["drop_rate"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no staging or old folder left

    (out / "notes.txt").write_text("the user's")  # no longer only what convert writes
    code, err = _convert(capsys, str(run), "--output", str(out), "--overwrite")
    assert code != 0 and "not written by mvit-zoo convert (it holds: README.md, config.json, model.safetensors, " \
                         "notes.txt" in err
    assert (out / "notes.txt").read_text() == "the user's"
    code, err = _convert(capsys, str(run), "--output", str(run), "--overwrite")  # a finetune run folder
    assert code != 0 and "not written by mvit-zoo convert" in err and (run / "config.json").is_file()


def test_interrupted_swap_keeps_the_previous_folder_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run_folder(tmp_path)
    out, _ = publish.convert_checkpoint(str(run), None, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    renames = []
    real_rename, real_replace = os.rename, os.replace

    def interrupted(kind: Any) -> Any:
        def rename(a: Any, b: Any) -> None:
            renames.append(Path(b).name)
            moving_in = Path(b) == out or Path(b).parent == out
            if moving_in and ".part" in str(a) and Path(a).name != "model.safetensors":  # after the weights: Ctrl-C
                raise KeyboardInterrupt
            kind(a, b)
        return rename

    monkeypatch.setattr(os, "rename", interrupted(real_rename))
    monkeypatch.setattr(os, "replace", interrupted(real_replace))
    with pytest.raises(KeyboardInterrupt):
        publish.convert_checkpoint(str(run), None, out, model_args={"drop_rate": 0.5}, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # weights and config still of one run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def test_a_killed_converts_staging_is_cleaned_and_others_kept(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staging = tmp_path / ".out.convert-abc123.part"  # killed while writing: its marker names a dead process
    staging.mkdir()
    (staging / publish.STAGING_MARKER).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                                              "time": 0}))
    (staging / ".model.safetensors.x.part").write_bytes(b"half")
    live = tmp_path / ".out.convert-def456.part"  # another convert at work
    live.mkdir()
    (live / publish.STAGING_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                           "time": 0}))
    lookalike = tmp_path / ".out.convert-user.part"  # the user's: no marker, not convert's files
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("mine")
    publish.convert_checkpoint(str(run), None, tmp_path / "out")
    assert not staging.exists() and live.exists() and (lookalike / "keep.txt").is_file()

    # killed between the two renames: the previous folder aside, none in place -> it is moved back
    aside = tmp_path / ".out.convert-ghi789.old"
    os.rename(tmp_path / "out", aside)
    with pytest.raises(publish.OutputExistsError, match="already exists"):
        publish.convert_checkpoint(str(run), None, tmp_path / "out")
    assert not aside.exists() and (tmp_path / "out" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# Small files that would allocate gigabytes
# ------------------------------------------------------------------------------------------------

def test_config_json_cannot_make_convert_build_a_huge_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run_folder(tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["model_args"]["depths"] = [1, 1, 40, 1]  # would be 40 x 1.8 M values at the default width
    config["model_args"]["embed_dim"] = 96
    (run / "config.json").write_text(json.dumps(config))

    def no_build(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was built before its size was checked")

    monkeypatch.setattr(registry, "create_model", no_build)
    with pytest.raises(CheckpointMismatchError, match=r"mvit_tiny built with config.json beside .* would hold "
                                                      r"[\d,]+ values .* holds [\d,]+: it cannot be"):
        publish.convert_checkpoint(str(run), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_build_size_is_checked_on_the_meta_device_from_the_header(tmp_path: Path) -> None:
    run = _run_folder(tmp_path)
    sd = safetensors.torch.load_file(str(run / "model.safetensors"))
    assert hub.weights_numel(run / "model.safetensors") == sum(t.numel() for t in sd.values())
    assert hub.check_build_size("mvit_tiny", {**KW, "num_classes": 3}, run) > 0
    with pytest.raises(CheckpointMismatchError, match=r"mvit_tiny built with --model-kwargs .*\"depths\": "
                                                      r"\[1, 1, 40, 1\].* GiB in float32"):
        hub.check_build_size("mvit_tiny", {"depths": (1, 1, 40, 1), "num_classes": 3}, run / "model.safetensors",
                             source="--model-kwargs")


def test_expanded_tensors_are_refused_before_they_grow(tmp_path: Path) -> None:
    path = tmp_path / "expanded.pth"
    torch.save({"norm.weight": torch.ones(1000).expand(4000, 1000)}, path)  # 4 kB stored, 16 MB as a copy
    assert path.stat().st_size < 10_000
    with pytest.raises(hub.InvalidWeightsError, match=r"refused to load .*expanded\.pth: tensor norm\.weight "
                                                      r"\(4000, 1000\) takes 16,000,000 bytes, but the file stores "
                                                      r"4,000 bytes"):
        hub.read_checkpoint(path)
    base = torch.randn(10)
    torch.save({"a": base[:8], "b": base[2:]}, path)  # two views over one storage: 64 bytes for 40
    with pytest.raises(hub.InvalidWeightsError, match="repeats or overlaps"):
        hub.read_weights(path)
    torch.save({"a": base[:5], "b": base[5:], "tied": base[:5]}, path)  # disjoint views and a tied one: fine
    assert set(hub.read_weights(path)) == {"a", "b", "tied"}


# ------------------------------------------------------------------------------------------------
# One reader: weights and training states
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_read_weights_refuses_non_float_tensors(tmp_path: Path, dtype: torch.dtype) -> None:
    sd = {k: v.clone() for k, v in _tiny().state_dict().items()}
    sd["norm.weight"] = sd["norm.weight"].to(dtype)
    hub.save_safetensors(sd, tmp_path / "model.safetensors")
    with pytest.raises(hub.InvalidWeightsError, match=r"not floating point: norm\.weight"):
        hub.read_weights(tmp_path / "model.safetensors")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_training_state_that_asks_to_run_code_is_refused(tmp_path: Path) -> None:
    path, marker = tmp_path / "optimizer.pt", tmp_path / "ran"
    torch.save({"optimizer": {"state": {}}, "rng": Payload(marker)}, path)
    with pytest.raises(hub.UnsafeCheckpointError) as info:
        hub.read_training_state(path)
    message = str(info.value)
    assert not marker.exists()
    for text in (f"refused to load {path}: this file asks to run code or build objects that a training state does "
                 f"not contain", "it was not loaded", "do not load it unsafely unless you trust its source"):
        assert text.lower() in message.lower(), text
    assert "weights_only=False" not in message and "`False`" not in message

    torch.save({"optimizer": {"state": {0: {"step": torch.tensor(3.0)}}}, "epoch": 2, "rng": [1, 2]}, path)
    assert hub.read_training_state(path)["epoch"] == 2
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(hub.CorruptCheckpointError, match=f"cannot read training state {path}"):
        hub.read_training_state(path)


# ------------------------------------------------------------------------------------------------
# publish: only confirmed files are official
# ------------------------------------------------------------------------------------------------

TAG = "mvit_v2_s_16x4.fb_k400"  # a PySlowFast tag: no published hash


def _slowfast_file(tmp_path: Path) -> tuple[Path, dict[str, Any], bytes]:
    from references import slowfast_checkpoint

    ref, _, kw = tv_reference(v2=True)
    url = publish.tag_config(TAG)["url"]
    src = tmp_path / "src" / url.rsplit("/", 1)[-1]
    src.parent.mkdir()
    torch.save(slowfast_checkpoint(ref), src)
    return src, kw, src.read_bytes()


def test_publish_refuses_an_unverified_source_file(tmp_path: Path, hub_cache: Path) -> None:
    src, kw, data = _slowfast_file(tmp_path)
    with pytest.raises(publish.UnverifiedSourceError, match=r"is not known to be the official file: the tag publishes "
                                                            r"no SHA-256.*--allow-unverified"):
        publish.publish(tmp_path / "out", only=TAG, source_dir=src.parent, model_args=kw, log=lambda m: None)
    assert not (tmp_path / "out").exists()
    with pytest.raises(publish.UnverifiedSourceError, match="--push uploads only verified files"):
        publish.publish(tmp_path / "out", only=TAG, source_dir=src.parent, model_args=kw, allow_unverified=True,
                        push=True, token="hf_x", log=lambda m: None)

    (folder,) = publish.publish(tmp_path / "out", only=TAG, source_dir=src.parent, model_args=kw,
                                allow_unverified=True, log=lambda m: None)
    card = (folder / "README.md").read_text()
    assert f"not a verified copy of an official checkpoint of {TAG}" in card and f"**Source:** {src}" in card
    for claim in ("by the paper's authors", "Published accuracy", "dl.fbaipublicfiles.com"):
        assert claim not in card, claim
    assert json.loads((folder / "config.json").read_text())["source"]["file"] == str(src)

    # the hash recorded when this machine downloaded and converted the official URL confirms the copy
    pcfg = publish.tag_config(TAG)
    hub.save_safetensors({"w": torch.zeros(1)}, hub._converted_path(pcfg, pcfg["url"]), metadata={
        "source_url": pcfg["url"], "source_sha256": hashlib.sha256(data).hexdigest()})
    (folder,) = publish.publish(tmp_path / "out", only=TAG, source_dir=src.parent, model_args=kw,
                                log=lambda m: None)
    card = (folder / "README.md").read_text()
    assert "by the paper's authors" in card and f"**Source:** {pcfg['url']}" in card


# ------------------------------------------------------------------------------------------------
# Messages
# ------------------------------------------------------------------------------------------------

def test_bad_settings_name_their_variable_and_are_not_value_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVIT_ZOO_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(hub.SettingError, match="MVIT_ZOO_DOWNLOAD_TIMEOUT='soon' is not a number") as info:
        hub.download_timeout()
    assert not isinstance(info.value, ValueError)  # a front end catching ValueError must not blame its flags
    monkeypatch.setenv("MVIT_ZOO_HUB_ORG", "my org/x")
    with pytest.raises(hub.SettingError, match="MVIT_ZOO_HUB_ORG='my org/x' is not a Hugging Face organisation"):
        hub.hub_repo_id("mvit-zoo/mvit_v2_s_16x4.fb_k400")
    monkeypatch.setenv("MVIT_ZOO_HUB_ORG", "my-org")
    assert hub.hub_repo_id("mvit-zoo/x@v1") == ("my-org/x", "v1")


def test_hf_home_that_is_a_file_is_named(tmp_path: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    home.write_text("not a folder")
    monkeypatch.delenv("MVIT_ZOO_CACHE")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    with pytest.raises(hub.SettingError, match=f"HF_HOME={home} is not a folder: {home} is a file"):
        mvit_zoo.create_model("mvit_v2_s_16x4.fb_k400", pretrained=True, **KW)


def test_full_disk_names_the_file_and_the_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch as st
    from safetensors import SafetensorError

    def full(*args: Any, **kwargs: Any) -> None:  # what safetensors 0.8 raises on a full tmpfs
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(hub.CacheError, match=r"no space left on device while writing .*w\.safetensors: free 4 MB "
                                             r"there, or point MVIT_ZOO_CACHE to a disk with room") as info:
        hub.save_safetensors({"w": torch.zeros(1 << 20)}, tmp_path / "w.safetensors")
    assert info.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def test_half_a_classifier_is_refused() -> None:
    model = _tiny()
    sd = dict(model.state_dict())
    del sd["head.fc.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): head\.fc\.bias"):
        convert_state_dict(sd, _tiny())
    del sd["head.fc.weight"]  # no classifier at all: the model keeps its own new one
    assert convert_state_dict(sd, _tiny()).report.fresh == ["head.fc.weight", "head.fc.bias"]
