"""`mvit-zoo` command line: dispatch, `convert`, `publish`, one-line errors, lazily imported commands."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from hub_server import REPO_ROOT as REPO, HubServer, run_py
from mvit_zoo.apps import cli
from references import max_diff, tv_reference, video_input

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL_ARGS = ["--model-arg", "depths=[1,2,1,1]", "--model-arg", "embed_dim=16", "--model-arg", "num_heads=1",
              "--model-arg", "img_size=[4,32,32]"]


def _tv_file(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    ref, _, _ = tv_reference(v2=True)
    path = tmp_path / "mvit_v2_s.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("convert", "publish", "finetune", "predict"):
        assert name in out
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", "--help"])
    assert info.value.code == 0 and "--model-arg KEY=VALUE" in capsys.readouterr().out


def test_convert(tmp_path: Path, hub_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref, src = _tv_file(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["convert", str(src), "--model", "mvit_v2_s_16x4.tv_k400", "--output", str(out)] + SMALL_ARGS) == 0
    printed = capsys.readouterr().out
    assert "layout torchvision" in printed and f"wrote {out / 'model.safetensors'}" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "mvit_v2_s_16x4" and config["num_classes"] == 3
    assert "BSD-3-Clause" in (out / "README.md").read_text()

    import mvit_zoo

    model = mvit_zoo.create_model("mvit_v2_s_16x4", **config["model_args"])
    model.load_state_dict(safetensors.torch.load_file(str(out / "model.safetensors")))  # no conversion needed
    assert max_diff(ref, model, video_input()) < 1e-4


def test_convert_from_url_and_errors(tmp_path: Path, hub: HubServer, hub_cache: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    _, src = _tv_file(tmp_path)
    url = hub.add_static("mvit_v2_s.pth", src.read_bytes())
    out = tmp_path / "from-url"
    assert cli.main(["convert", url, "--model", "mvit_v2_s_16x4", "--out", str(out)] + SMALL_ARGS) == 0
    assert (out / "model.safetensors").is_file()
    assert url in (out / "README.md").read_text()
    capsys.readouterr()

    assert cli.main(["convert", url, "--model", "mvit_v2_s_16x4", "--out", str(tmp_path / "x"), "--sha256",
                     "00ff"] + SMALL_ARGS) == 2
    assert "mvit-zoo convert: error: downloaded" in capsys.readouterr().err
    assert cli.main(["convert", str(src), "--model", "mvit_b_16x4", "--out", str(tmp_path / "y")] + SMALL_ARGS) == 2
    err = capsys.readouterr().err
    assert "mvit-zoo convert: error: checkpoint (torchvision layout) does not fit mvit_b_16x4" in err
    assert cli.main(["convert", str(tmp_path / "none.pth"), "--model", "mvit_tiny", "--out", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli.main(["convert", str(src), "--model", "mvit_v2_s_16x4.bogus", "--out", str(tmp_path / "z")]) == 2
    assert "unknown pretrained tag 'bogus' for mvit_v2_s_16x4" in capsys.readouterr().err
    assert cli.main(["convert", str(src), "--model", "mvit_v2_s_16x4", "--out", str(tmp_path / "z"), "--model-arg",
                     "depths"]) == 2
    assert "--model-arg expects KEY=VALUE" in capsys.readouterr().err


def test_publish_list_and_push_without_token(tmp_path: Path, hub_cache: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setenv("MVIT_ZOO_HUB_ORG", "my-org")
    assert cli.main(["publish", "--list", "--only", "mvit_v2_s_16x4.*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    from mvit_zoo.weights import publish
    assert [line.split("\t")[0] for line in lines] == publish.official_tags("mvit_v2_s_16x4.*")
    assert all(line.split("\t")[1] == f"my-org/{line.split(chr(9))[0]}" for line in lines)
    assert any(line.endswith("mvit_v2_s-ae3be167.pth") for line in lines)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert cli.main(["publish", "--push", "--only", "mvit_v2_s_16x4.tv_k400", "--out", str(tmp_path / "o")]) == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err
    assert cli.main(["publish", "--only", "nothing*", "--out", str(tmp_path / "o")]) == 2
    assert "no official checkpoint matches 'nothing*'" in capsys.readouterr().err


def test_commands_are_imported_lazily(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    broken = cli.COMMANDS["finetune"]._replace(module="mvit_zoo._no_such_module")
    monkeypatch.setitem(cli.COMMANDS, "finetune", broken)
    assert cli.main(["finetune", "--help"]) == 1
    assert "mvit-zoo finetune: unavailable: cannot import mvit_zoo._no_such_module" in capsys.readouterr().err
    assert cli.main(["publish", "--list", "--only", "mvit_b24_*"]) == 0  # the others still work
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_entry_point_runs_as_a_module(hf_env: dict[str, str]) -> None:
    result = run_py("import sys; from mvit_zoo.apps.cli import main; sys.exit(main(['publish', '--list']))",
                    {**hf_env, "OMP_NUM_THREADS": "1"})
    assert "mvit_v2_l_40x3.fb_ssv2\tmvit-zoo/mvit_v2_l_40x3.fb_ssv2\thttps://dl.fbaipublicfiles.com/" in result.stdout
    import tomllib

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["mvit-zoo"] == "mvit_zoo.apps.cli:main"


def _fake_command(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """Make `mvit-zoo finetune` a command whose run raises `error`."""
    def run(args: object) -> int:
        raise error

    monkeypatch.setattr(cli, "_load", lambda name: argparse.Namespace(configure_parser=lambda parser: None, run=run))


@pytest.mark.parametrize(("error", "message"), [
    (cli.CliError("no such file: x.jpg; pass image files"), "no such file: x.jpg; pass image files"),
    (ValueError("a bad value\n  on two lines"), "a bad value on two lines"),
    (FileNotFoundError(), "FileNotFoundError (run with --debug for its traceback)"),  # not an empty message
    (NotADirectoryError(20, "Not a directory", "data.txt"), "[Errno 20] Not a directory: 'data.txt'"),
    (SystemExit("error: data.txt must be a folder"), "data.txt must be a folder"),  # a command's SystemExit(text)
], ids=["CliError", "ValueError", "empty", "NotADirectoryError", "SystemExit-text"])
def test_user_error_is_one_line_exit_2(error: BaseException, message: str, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    _fake_command(monkeypatch, error)
    assert cli.main(["finetune"]) == cli.EXIT_USER_ERROR == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"mvit-zoo finetune: error: {message}\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback(where: str, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    _fake_command(monkeypatch, cli.CliError("no such file: x.jpg"))
    argv = ["--debug", "finetune"] if where == "before" else ["finetune", "--debug"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "CliError: no such file: x.jpg" in err
    assert err.splitlines()[-1] == "mvit-zoo finetune: error: no such file: x.jpg"


def test_unexpected_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_command(monkeypatch, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["finetune"])
    _fake_command(monkeypatch, SystemExit(3))  # sys.exit(status) of a command passes through
    with pytest.raises(SystemExit) as info:
        cli.main(["finetune"])
    assert info.value.code == 3


def test_argument_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["predict", "--top-k", "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "mvit-zoo predict: error: argument --top-k: must be at least 1, got 0")


def test_convert_and_publish_live_in_apps() -> None:
    assert cli.COMMANDS["convert"].module == "mvit_zoo.apps.convert"
    assert cli.COMMANDS["publish"].module == "mvit_zoo.apps.publish"
    from mvit_zoo.weights import publish

    assert not hasattr(publish, "configure_parser") and not hasattr(publish, "run_convert")  # library only
    from mvit_zoo.apps import convert

    with pytest.raises(cli.CliError, match=r"--model-arg expects KEY=VALUE, got 'depths'"):
        convert.parse_model_args(["depths"])


def test_convert_builds_the_model_the_checkpoint_needs(tmp_path: Path, hub_cache: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A pytorchvideo file converted without a tag: config.json carries the pool-norm eps its layout
    implies; stating another one converts as asked, with a one-line warning naming the fix."""
    import mvit_zoo
    from references import pv_checkpoint, pv_reference

    ref, _, _ = pv_reference()
    src = tmp_path / "model.pyth"
    torch.save(pv_checkpoint(ref), src)
    small = SMALL_ARGS[:6]  # no img_size: read from the position tables
    assert cli.main(["convert", str(src), "--model", "mvit_b_16x4", "--out", str(tmp_path / "a")] + small) == 0
    assert "warning" not in capsys.readouterr().err
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model_args"]["pool_norm_eps"] == 1e-5 and config["model_args"]["img_size"] == [4, 32, 32]
    model = mvit_zoo.create_model("mvit_b_16x4", **config["model_args"])
    model.load_state_dict(safetensors.torch.load_file(str(tmp_path / "a" / "model.safetensors")))
    assert max_diff(ref, model, video_input()) < 1e-5

    assert cli.main(["convert", str(src), "--model", "mvit_b_16x4", "--out", str(tmp_path / "b"), "--model-arg",
                     "pool_norm_eps=1e-6"] + small) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mvit-zoo convert: warning: pool_norm_eps: the pytorchvideo checkpoint implies 1e-05, the model has "
                   "1e-06; create the model as 'mvit_b_16x4.pv_k400' (its weights need these values) or with "
                   "mvit_zoo.create_model('mvit_b_16x4', pool_norm_eps=1e-05)"]



PREDICT_TINY = ["predict", "--model", "mvit_tiny", "--no-pretrained", "--json", "--device", "cpu", "--model-kwargs",
                '{"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": 1}']


@pytest.mark.parametrize(("argv", "unbuffered"), [
    (["publish", "--list"], False), pytest.param(["publish", "--list"], True, marks=pytest.mark.slow),
    pytest.param(["--help"], False, marks=pytest.mark.slow), pytest.param(PREDICT_TINY, False, marks=pytest.mark.slow),
])
def test_closed_stdout_exits_quietly(argv: list[str], unbuffered: bool, hf_env: dict[str, str]) -> None:
    """`mvit-zoo ... | head`: a reader that closed the pipe before the output came ends the command with exit
    code 141 and nothing on stderr, not a BrokenPipeError traceback; buffered stdout fails at the flush, unbuffered
    (PYTHONUNBUFFERED=1) at the print."""
    import subprocess
    import sys

    env = {key: value for key, value in hf_env.items() if key != "PYTHONUNBUFFERED"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])})
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "mvit_zoo", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    proc.stdout.close()  # the reader is gone before the command writes a byte (it takes seconds to import)
    _, err = proc.communicate(timeout=300)
    notes = [line for line in err.splitlines() if line.startswith("note: ")]  # (--no-pretrained's random weights)
    assert (proc.returncode, err) == (cli.EXIT_BROKEN_PIPE, "".join(f"{n}\n" for n in notes))


_TORCH_FREE = ("import sys\nfrom mvit_zoo.apps.cli import main\ntry:\n    code = main({argv!r})\n"
               "except SystemExit as e:\n    code = e.code\n"
               "print('exit', code, 'torch imported:', 'torch' in sys.modules, file=sys.stderr)")


@pytest.mark.parametrize("argv", [["--version"], ["finetune", "--help"], ["predict", "--help"], ["validate", "--help"],
                                  ["convert", "--help"], ["publish", "--help"], ["finetune", "--epochs", "x"]])
def test_help_version_and_usage_errors_do_not_import_torch(argv: list[str]) -> None:
    """The parsers are built from modules that import no torch: `--help`, `--version` and a usage error answer
    without it (importing torch and timm takes seconds)."""
    result = run_py(_TORCH_FREE.format(argv=argv), dict(os.environ), timeout=60)
    code = 2 if argv[-1] == "x" else 0
    assert result.stderr.splitlines()[-1] == f"exit {code} torch imported: False", result.stderr
    if argv[-1] == "x":
        assert "mvit-zoo finetune: error: argument --epochs: invalid int value: 'x'" in result.stderr


def test_python_m_help_does_not_import_torch() -> None:
    code = ("import runpy, sys\nsys.argv = ['mvit_zoo', '--help']\ntry:\n"
            "    runpy.run_module('mvit_zoo', run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch imported:', 'torch' in sys.modules)")
    result = run_py(code, dict(os.environ), timeout=60)
    assert "usage: mvit-zoo" in result.stdout and result.stdout.splitlines()[-1] == "exit 0 torch imported: False"


def test_option_vocabularies_match_their_owners() -> None:
    """`apps.options` and `apps.extract` copy a few names of torch-importing modules so that parsers need no torch;
    they agree."""
    from mvit_zoo.apps import options
    from mvit_zoo.data.reader import BACKENDS
    from mvit_zoo.data.recipes import RECIPES
    from mvit_zoo.data.sources import FORMATS
    from mvit_zoo.data.views import SLOWFAST_TARGET_FPS
    from mvit_zoo.weights import hub

    assert options.DATA_FORMATS == FORMATS and options.VIDEO_BACKENDS == BACKENDS
    assert options.RECIPE_NAMES == tuple(sorted(RECIPES)) and options.SLOWFAST_TARGET_FPS == SLOWFAST_TARGET_FPS
    assert (options.HUB_ORG_ENV, options.DEFAULT_HUB_ORG) == (hub.HUB_ORG_ENV, hub.DEFAULT_HUB_ORG)
    from mvit_zoo import extraction
    from mvit_zoo.apps import extract
    assert (extract._FORMATS, extract._SPATIAL_POOLS) == (extraction.FORMATS, extraction.SPATIAL_POOLS)
    assert extract._OWN_FILES == (extraction.INDEX_FILE,)
    assert extraction._RANK_INDEX == extract._RANK_PREFIX + "{rank}" + extract._RANK_SUFFIX


def test_finetune_recipe_through_the_command_line(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`mvit-zoo finetune --recipe k400` makes the recipe the defaults (the front calls prepare_parser), and an
    explicit option still overrides it."""
    from mvit_zoo.apps import finetune

    seen = {}
    monkeypatch.setattr(finetune, "run", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["finetune", "--recipe", "k400", "--epochs", "3", "--model", "m", "--data", "d",
                     "--output", "o"]) == 0
    assert "--recipe k400 (SlowFast" in capsys.readouterr().err
    assert seen["clips_per_video"] == 2 and seen["mixup"] == 0.8 and seen["epochs"] == 3
    finetune._check_args(argparse.Namespace(**seen))  # applied: not refused as a recipe given too late


def test_installed_command_accepts_recipe() -> None:
    done = subprocess.run([sys.executable, "-m", "mvit_zoo", "finetune", "--recipe", "ssv2", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "--recipe ssv2 (SlowFast" in done.stderr and "usage: mvit-zoo finetune" in done.stdout
