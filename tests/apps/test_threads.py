"""`--threads`: the default from the usable cores less the data workers, OMP_NUM_THREADS, torch's setting."""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

import pytest
import torch

from mvit_zoo.apps import threads


@pytest.fixture
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process allowed on 4 cores (of a bigger machine), with OMP_NUM_THREADS unset."""
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)


@pytest.fixture
def keep_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    threads.add_threads_argument(parser)
    return parser.parse_args(argv)


def test_usable_cores_is_the_affinity_mask() -> None:
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert threads.usable_cores() == expected >= 1


@pytest.mark.usefixtures("four_cores")
@pytest.mark.parametrize(("argv", "workers", "expected"), [
    ((), 0, 4), ((), 1, 3), ((), 8, 1), (("--threads", "auto"), 2, 2), (("--threads", "3"), 8, 3),
])
def test_resolve_threads(argv: tuple[str, ...], workers: int, expected: int) -> None:
    assert threads.resolve_threads(_parse(*argv).threads, workers) == expected


@pytest.mark.usefixtures("four_cores")
def test_omp_num_threads_is_the_default_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(threads.THREADS_ENV, "2")
    assert threads.resolve_threads(_parse().threads, workers=3) == 2
    assert threads.resolve_threads(_parse("--threads", "auto").threads, workers=3) == 1  # given: the flag wins
    monkeypatch.setenv(threads.THREADS_ENV, "3,1")  # OpenMP's nested list: the outer level
    assert threads.resolve_threads(None) == 3
    monkeypatch.setenv(threads.THREADS_ENV, "many")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='many' is not a number of threads.*--threads N"):
        threads.resolve_threads(None)


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_bad_threads_is_a_usage_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parse("--threads", bad)
    assert info.value.code == 2 and "--threads" in capsys.readouterr().err


def test_help_documents_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse("--help")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--threads N|auto" in help_text and "$OMP_NUM_THREADS when set" in help_text and "--workers" in help_text


@pytest.mark.usefixtures("four_cores", "keep_torch_threads")
def test_apply_threads_sets_torch() -> None:
    assert threads.apply_threads(None, workers=1) == 3 == torch.get_num_threads()
    assert threads.apply_threads(1) == 1 == torch.get_num_threads()



def test_tests_run_torch_on_one_thread_unless_omp_num_threads_says() -> None:
    """tests/conftest.py sets OMP_NUM_THREADS=1 (when unset) before torch loads, for every test process."""
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"].split(",")[0])
