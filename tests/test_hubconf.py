"""torch.hub: hubconf.py at the repository root, loaded from a clone without `pip install`."""
from __future__ import annotations

import ast
import inspect
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

import mvit_zoo

REPO = Path(__file__).resolve().parents[1]
Case = tuple[str, dict[str, Any], tuple[int, ...]]
IMAGE: Case = ("mvit_tiny", dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1, img_size=32, num_classes=10),
         (2, 3, 32, 32))
VIDEO: Case = ("mvit_v2_s_16x4",
         dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1, img_size=(4, 32, 32), num_classes=3),
         (2, 3, 4, 32, 32))

# tiny models: one torch thread is many times faster than two on a busy 2-core machine (conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread")


def _hub_load(*args: Any, **kwargs: Any) -> Any:
    return torch.hub.load(str(REPO), *args, source="local", **kwargs)


def _assert_same_model(a: torch.nn.Module, b: torch.nn.Module, shape: tuple[int, ...]) -> None:
    assert type(a) is type(b)
    assert a.cfg == b.cfg
    assert a.pretrained_cfg == b.pretrained_cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.fixture
def github_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A torch.hub cache in which 'mvit-zoo/mvit-zoo:main' is this checkout, so that the GitHub-only
    torch.hub.list / torch.hub.help run offline on it."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    torch.hub.set_dir(str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "mvit-zoo_mvit-zoo_main").symlink_to(REPO, target_is_directory=True)
    return "mvit-zoo/mvit-zoo:main"


def test_entrypoints_are_every_registered_model_and_the_backbone(github_cache: str) -> None:
    listed = torch.hub.list(github_cache, trust_repo=True, skip_validation=True, verbose=False)
    assert sorted(listed) == sorted(mvit_zoo.list_models() + ["mvit_backbone"])
    doc = torch.hub.help(github_cache, "mvit_v2_s_16x4", trust_repo=True, skip_validation=True)
    assert "mvit_v2_s_16x4" in doc and "pretrained" in doc
    assert "feature" in torch.hub.help(github_cache, "mvit_backbone", trust_repo=True, skip_validation=True)


def test_dependencies_are_importable_names() -> None:
    import importlib.util

    hubconf = torch.hub._import_module("hubconf", str(REPO / "hubconf.py"))
    assert {"torch", "timm"} <= set(hubconf.dependencies)
    for name in hubconf.dependencies:
        assert importlib.util.find_spec(name) is not None, name


@pytest.mark.parametrize("case", [IMAGE, VIDEO], ids=["image", "video"])
def test_local_load_is_the_timm_model(case: Case) -> None:
    name, kwargs, shape = case
    torch.manual_seed(0)
    from_hub = _hub_load(name, pretrained=False, **kwargs)
    torch.manual_seed(0)
    from_timm = timm.create_model(name, pretrained=False, **kwargs)
    _assert_same_model(from_hub, from_timm, shape)


@pytest.mark.parametrize("case", [IMAGE, VIDEO], ids=["image", "video"])
def test_local_load_pretrained_is_the_timm_model(case: Case, tmp_path: Path) -> None:
    name, kwargs, shape = case
    torch.manual_seed(1)
    source = timm.create_model(name, **kwargs)
    weights = mvit_zoo.save_safetensors(source.state_dict(), tmp_path / "weights.safetensors")
    overlay = dict(file=str(weights))
    torch.manual_seed(2)
    from_hub = _hub_load(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    torch.manual_seed(3)  # another init: only the loaded weights can make them equal
    from_timm = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    _assert_same_model(from_hub, from_timm, shape)
    for k, v in source.state_dict().items():
        assert torch.equal(from_hub.state_dict()[k], v), k


def test_pretrained_tag_by_name(tmp_path: Path) -> None:
    name, kwargs, _ = VIDEO
    kwargs = dict(kwargs, num_classes=174)
    weights = mvit_zoo.save_safetensors(timm.create_model(name, **kwargs).state_dict(), tmp_path / "w.safetensors")
    for tag in ("fb_ssv2", "mvit_v2_s_16x4.fb_ssv2"):
        model = _hub_load(name, pretrained=tag, pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)
        assert model.pretrained_cfg["tag"] == "fb_ssv2"
        assert model.pretrained_cfg["label_set"] == "ssv2"
    with pytest.raises(ValueError, match="unknown pretrained tag 'fb_nope'"):
        _hub_load(name, pretrained="fb_nope", **kwargs)


@pytest.mark.parametrize("case", [IMAGE, VIDEO], ids=["image", "video"])
def test_backbone_is_the_features_only_model(case: Case) -> None:
    name, kwargs, shape = case
    kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
    torch.manual_seed(0)
    backbone = _hub_load("mvit_backbone", name, out_indices=(1, 3), **kwargs)
    torch.manual_seed(0)
    reference = timm.create_model(name, features_only=True, out_indices=(1, 3), **kwargs)
    x = torch.randn(shape)
    with torch.no_grad():
        maps, expected = backbone.eval()(x), reference.eval()(x)
    assert len(maps) == 2
    for m, e, info in zip(maps, expected, backbone.feature_info.get_dicts()):
        assert torch.equal(m, e)
        assert m.shape[1] == info["num_chs"]
        assert m.shape[-1] == -(-shape[-1] // info["reduction"])
    assert backbone.feature_info.reduction() == [8, 32]


def test_clone_without_install(tmp_path: Path) -> None:
    """A fresh interpreter that cannot import an installed mvit_zoo loads the clone's package."""
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy2(REPO / "hubconf.py", clone / "hubconf.py")
    shutil.copytree(REPO / "mvit_zoo", clone / "mvit_zoo", ignore=shutil.ignore_patterns("__pycache__"))
    code = textwrap.dedent(f"""
        import importlib.util, sys
        # as if mvit-zoo were not installed: drop an editable install's import hook
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
        assert importlib.util.find_spec("mvit_zoo") is None, "mvit_zoo is installed: the test needs a bare env"
        import torch
        torch.set_num_threads(1)
        kw = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1)
        image = torch.hub.load({str(clone)!r}, "mvit_small", source="local", img_size=32, num_classes=5, **kw)
        video = torch.hub.load({str(clone)!r}, "mvit_v2_s_16x4", source="local", pretrained=False,
                               img_size=(4, 32, 32), num_classes=3, **kw)
        import mvit_zoo
        print(mvit_zoo.__file__)
        print(tuple(image(torch.randn(1, 3, 32, 32)).shape), tuple(video(torch.randn(1, 3, 4, 32, 32)).shape))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    path, shapes = done.stdout.strip().splitlines()[-2:]
    assert Path(path).resolve().is_relative_to(clone.resolve())
    assert shapes == "(1, 5) (1, 3)"


def _documented_calls() -> list[ast.Call]:
    """The torch.hub calls shown in hubconf.py's docstring."""
    doc = ast.get_docstring(ast.parse((REPO / "hubconf.py").read_text()))
    assert doc is not None
    code = "\n".join(line[4:] for line in doc.splitlines() if line.startswith("    "))
    calls = [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)
             and ast.unparse(node.func).startswith("torch.hub.")]
    assert {"torch.hub.load", "torch.hub.list"} <= {ast.unparse(c.func) for c in calls}
    return calls


def test_documented_calls_fit_torch_hub_signatures() -> None:
    """Every documented call binds to its torch.hub function: no `source=` where torch.hub has none."""
    for call in _documented_calls():
        fn = getattr(torch.hub, ast.unparse(call.func).rsplit(".", 1)[1])
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        inspect.signature(fn).bind(*args, **kwargs)
        if kwargs.get("source") != "local":  # a GitHub repository, with its ref: no network request to find it
            assert re.fullmatch(r"[\w.-]+/[\w.-]+:[\w.-]+", args[0]), ast.unparse(call)
    # what the docstring says does not work, does not
    with pytest.raises(TypeError, match="source"):
        torch.hub.list(str(REPO), source="local")
    with pytest.raises(ValueError):
        torch.hub.list(str(REPO))


def test_documented_calls_run(github_cache: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each documented call, run offline: GitHub ones on a torch.hub cache that holds this checkout,
    local ones on it; loads build small random models (the weights are tested above)."""
    small = {k: v for k, v in IMAGE[1].items() if k not in ("img_size", "num_classes")}
    for call in _documented_calls():
        fn = ast.unparse(call.func).rsplit(".", 1)[1]
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        args[0] = str(REPO) if args[0] == "path/to/mvit-zoo" else args[0]
        if args[0] != str(REPO):
            assert args[0] == github_cache
        if fn == "list":
            assert sorted(torch.hub.list(*args, **kwargs)) == sorted(mvit_zoo.list_models() + ["mvit_backbone"])
        elif fn == "help":
            assert "pretrained" in torch.hub.help(*args, **kwargs)
        else:
            kwargs["pretrained"] = False
            model = torch.hub.load(*args, **kwargs, **small)
            assert isinstance(model, torch.nn.Module)
            name = args[2] if len(args) > 2 else args[1]
            assert model.pretrained_cfg["architecture"] == name
