"""`--threads`: how many CPU threads torch's intra-op parallel regions (GEMMs, convolutions, attention) use.

torch's default is one thread per core of the machine. When other processes hold some of those cores (another
job, or the command's own data-loading workers decoding video), every parallel region waits for its slowest
thread, and a small model's step runs several times slower than on one thread. The default here is the cores
this process may run on, less the data workers; `OMP_NUM_THREADS`, when set, is taken as the user's choice.

Importing this module does not import torch, so a parser can add `--threads` cheaply.
"""
from __future__ import annotations

import argparse
import os
from typing import Union

__all__ = ["THREADS_ENV", "add_threads_argument", "apply_threads", "resolve_threads", "usable_cores"]

THREADS_ENV = "OMP_NUM_THREADS"


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (Linux: taskset, cgroups cpusets) where the
    OS has one, else every core."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _threads_arg(text: str) -> Union[int, str]:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of threads or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """Add `--threads N|auto` to `parser` (value: an int, 'auto', or None when not given)."""
    parser.add_argument("--threads", type=_threads_arg, default=None, metavar="N|auto",
                        help=f"CPU threads for torch's parallel ops (default: ${THREADS_ENV} when set, else auto: "
                             "the cores this process may use less --workers, at least 1)")


def resolve_threads(args_threads: Union[int, str, None], workers: int = 0) -> int:
    """The intra-op thread count for `--threads` (int, 'auto' or None: not given) beside `workers` data-loading
    processes. None takes `OMP_NUM_THREADS` when set (its first entry, as OpenMP reads '4,2'), else 'auto'."""
    if args_threads is None:
        env = os.environ.get(THREADS_ENV, "").strip()
        if env:
            first = env.split(",")[0].strip()
            if not first.isdigit() or int(first) < 1:
                raise ValueError(f"{THREADS_ENV}={env!r} is not a number of threads; set it to a positive integer, "
                                 f"unset it, or pass --threads N")
            return int(first)
        args_threads = "auto"
    if args_threads == "auto":
        return max(1, usable_cores() - max(0, workers))
    return int(args_threads)


def apply_threads(args_threads: Union[int, str, None], workers: int = 0) -> int:
    """Set torch's intra-op thread count from `--threads` (see `resolve_threads`); returns it."""
    import torch

    threads = resolve_threads(args_threads, workers)
    torch.set_num_threads(threads)
    return threads

