"""Packaging: the license and metadata, and an sdist that holds everything its own tests need."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tomllib
from email.parser import Parser
from pathlib import Path

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


def test_readme_shows_the_cpu_torch_install() -> None:
    readme = (REPO / "README.md").read_text()
    assert "`pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu`" in readme
    assert 'pip install -e ".[test]"\npytest\n' in readme  # the default install stays as it is
