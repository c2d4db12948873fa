"""`ops.dispatch`'s environment switches: every usual spelling of a boolean, a warning for the others."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mvit_zoo.ops import dispatch

DISPATCH_FILE = Path(dispatch.__file__)


@pytest.mark.parametrize(("value", "expected"), [
    ("1", True), ("true", True), ("Yes", True), ("ON", True), ("enable", True), (" True ", True),
    ("0", False), ("false", False), ("NO", False), ("Off", False), ("disable", False), ("DISABLE", False),
])
def test_env_flag_spellings(value: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVIT_TEST_FLAG", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.env_flag("MVIT_TEST_FLAG", not expected) is expected


@pytest.mark.parametrize("default", [True, False])
def test_env_flag_unset_or_empty_is_the_default(default: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MVIT_TEST_FLAG", raising=False)
    assert dispatch.env_flag("MVIT_TEST_FLAG", default) is default
    monkeypatch.setenv("MVIT_TEST_FLAG", "")
    assert dispatch.env_flag("MVIT_TEST_FLAG", default) is default


def test_env_flag_warns_on_other_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MVIT_TEST_FLAG", "nope")
    with pytest.warns(RuntimeWarning, match=r"MVIT_TEST_FLAG='nope' is not a recognised value.*disable") as record:
        assert dispatch.env_flag("MVIT_TEST_FLAG", True) is True
    assert len(record) == 1


def test_fused_attn_env_is_read_at_import() -> None:
    """A fresh `ops/dispatch.py` (loaded on its own, in a subprocess) under MVIT_FUSED_ATTN=disable builds the
    explicit path, and a value it does not know warns once."""
    code = f"""
import importlib.util, json, os, warnings
results = []
for value in ("disable", "Off", "enable", "sometimes"):
    os.environ["MVIT_FUSED_ATTN"] = value
    spec = importlib.util.spec_from_file_location("dispatch_" + value, {str(DISPATCH_FILE)!r})
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec.loader.exec_module(module)
    results.append([module.use_fused_attn(), [str(w.message) for w in caught]])
print(json.dumps(results))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.splitlines()[-1])
    assert [fused for fused, _ in results] == [False, False, True, True]
    assert [len(caught) for _, caught in results] == [0, 0, 0, 1]
    assert "MVIT_FUSED_ATTN='sometimes'" in results[3][1][0]
