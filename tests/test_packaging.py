"""Packaging: the license and metadata, and an sdist that holds everything its own tests need."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tomllib
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".ci", "__pycache__", "*.egg-info", ".pytest_cache",
                                     ".ruff_cache", ".hypothesis", "build", "dist")


def test_license_file_is_the_apache_2_text() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text
    assert "Programming Language :: Python :: 3" in project["classifiers"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639: the expression says it


def test_sdist_holds_the_tests_and_their_helpers(tmp_path: Path) -> None:
    """Build the sdist offline (setuptools' PEP 517 hook, on a copy of the tree so that nothing is written
    here) and check that it has every test module, the shared helpers and the license."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)
    out = tmp_path / "dist"
    out.mkdir()
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    name = done.stdout.strip().splitlines()[-1]
    with tarfile.open(out / name) as sdist:
        root = name.removesuffix(".tar.gz")
        files = {m.name.removeprefix(root + "/") for m in sdist.getmembers() if m.isfile()}
        pkg_info = Parser().parsestr(sdist.extractfile(f"{root}/PKG-INFO").read().decode())  # type: ignore[union-attr]
    tests = {p.relative_to(REPO).as_posix() for p in (REPO / "tests").rglob("*.py")}
    assert {"tests/conftest.py", "tests/references.py", "tests/hub_server.py"} <= tests <= files
    assert {"LICENSE", "README.md", "hubconf.py", "pyproject.toml", "benchmarks/bench.py",
            "mvit_zoo/data/chelsea.jpg"} <= files
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    assert pkg_info["License-Expression"] == "Apache-2.0" and pkg_info.get_all("License-File") == ["LICENSE"]
    assert "Topic :: Scientific/Engineering :: Image Recognition" in pkg_info.get_all("Classifier")


def test_readme_chooses_the_torch_build_before_installing() -> None:
    """The set-up section gives one command per kind of machine before the install runs, the CPU one installing
    torch and torchvision together from one index; it explains the mismatch symptom; CI runs the PyPI command."""
    readme = (REPO / "README.md").read_text()
    setup = readme[readme.index("## Set up and test"):readme.index("\n## ", readme.index("## Set up and test") + 1)]
    blocks = [block.split("\n", 1)[1] for block in setup.split("```")[1::2]]
    cpu = 'pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu && pip install -e ".[test]"\n'
    assert blocks[:3] == [cpu, 'pip install -e ".[test]"\n', "pytest -n auto\n"]
    pypi = setup.index('```bash\npip install -e ".[test]"')
    assert setup.index("CPU-only machine") < setup.index(cpu) < setup.index("machine with an NVIDIA GPU") < pypi
    assert "`operator torchvision::nms does\nnot exist`" in setup and "--force-reinstall" in setup
    ci = (REPO / ".ci" / "run").read_text()
    assert '\npip install -e ".[test]"\n' in ci and "\npython -m pytest -ra -n auto\n" in ci  # the README's test
    assert "index-url" not in ci and "download.pytorch.org" not in ci  # CI needs no index but PyPI

def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, **env})


def test_import_loads_only_what_registering_the_models_needs() -> None:
    """`import mvit_zoo` registers the models and leaves evaluation, data and checkpoint conversion unloaded;
    their public names load on first use."""
    code = ("import sys, mvit_zoo, timm\n"
            "print(sorted(m for m in sys.modules if m.startswith(('mvit_zoo.evaluation', 'mvit_zoo.data', "
            "'mvit_zoo.weights.convert', 'mvit_zoo.apps'))))\n"
            "print('mvit_v2_s_16x4' in timm.list_models('mvit*'))\n"
            "from mvit_zoo import evaluate, Evaluation, convert_state_dict, WeightsUnavailableError\n"
            "print(evaluate.__module__, Evaluation.__module__, convert_state_dict.__module__, "
            "'evaluate' in dir(mvit_zoo))")
    done = _python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:3] == ["[]", "True", "mvit_zoo.evaluation mvit_zoo.evaluation "
                                           "mvit_zoo.weights.convert True"]


def test_missing_attribute_is_an_attribute_error() -> None:
    import mvit_zoo

    try:
        mvit_zoo.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("mvit_zoo.no_such_name did not raise")


def test_torchvision_built_for_another_torch_is_one_line(tmp_path: Path) -> None:
    """A torchvision whose compiled ops do not load (as when pip pairs a CPU torch with PyPI's CUDA
    torchvision) fails the import of timm after `import mvit_zoo` with an ImportError naming both versions and
    the reinstall."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text(  # what torchvision/_meta_registrations.py raises then
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    code = ("import importlib.metadata, torch\n"
            "import mvit_zoo\ntry:\n    import timm\nexcept ImportError as e:\n"
            "    print(torch.__version__, importlib.metadata.version('torchvision'), torch.version.cuda)\n"
            "    print(e)\n")
    done = _python(code, PYTHONPATH=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    (torch_version, tv_version, cuda), message = done.stdout.splitlines()[0].split(), done.stdout.splitlines()[1]
    assert f"torchvision {tv_version} was built for another torch than this torch {torch_version}" in message
    fix = f"pip install --force-reinstall torch=={torch_version.split('+')[0]} torchvision"
    assert message.endswith(fix if cuda != "None" else fix + " --index-url https://download.pytorch.org/whl/cpu")


def _run(code: str) -> str:
    done = _python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_leaves_torch_and_timm_out() -> None:
    """`import mvit_zoo` imports neither torch nor timm (the command line answers without them)."""
    out = _run("import sys, mvit_zoo; print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    assert out.strip() == "[]"


def test_models_are_registered_whatever_the_import_order() -> None:
    """mvit_zoo's models are in timm's registry after `import mvit_zoo` then timm (a post-import hook), timm then
    mvit_zoo, `from timm import ...`, and through a public name."""
    for code in ("import mvit_zoo, timm; print(timm.list_models('mvit_tiny*'))",
                 "import timm, mvit_zoo; print(timm.list_models('mvit_tiny*'))",
                 "import mvit_zoo\nfrom timm import create_model, list_models\nprint(list_models('mvit_tiny*'))\n"
                 "print(type(create_model('mvit_tiny', pretrained=False)).__name__)",
                 "import mvit_zoo, sys; print(mvit_zoo.list_models('mvit_tiny*')); import timm\n"
                 "print([f for f in sys.meta_path if 'mvit_zoo' in type(f).__module__])"):
        out = _run(code)
        assert "'mvit_tiny'" in out, (code, out)
        assert "MViT" in out if "create_model" in code else True
        assert "[]" in out.splitlines()[-1] if "meta_path" in code else True


def _modules() -> list[str]:
    import pkgutil

    import mvit_zoo

    return sorted(m.name for m in pkgutil.walk_packages(mvit_zoo.__path__, "mvit_zoo.") if ".__main__" not in m.name)


@pytest.mark.parametrize("module", ["mvit_zoo.model.mvit", pytest.param("all", marks=pytest.mark.slow)])
def test_each_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    """Whichever module a program imports first (the model file, say, whose `import timm` sets off the
    registration, which imports the model file), it imports, and the models are registered."""
    for name in _modules() if module == "all" else [module]:
        out = _run(f"import {name}, timm; print(timm.list_models('mvit_tiny'))")
        assert "'mvit_tiny'" in out, name
