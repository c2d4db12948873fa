"""This machine and this process as Linux reports them in /proc: the CPU and memory of the host for the results'
headers; resident set size now and at its peak, and a reset of the peak, for the peak-RSS figures."""
from __future__ import annotations

import contextlib
import os
import platform
import resource
from typing import Optional


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_gb() -> Optional[float]:
    """The host's memory in GiB (/proc/meminfo MemTotal), None where there is no /proc."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    return None


def usable_cores() -> Optional[int]:
    """Cores this process may run on (its affinity), or the machine's count where affinity is unknown."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def status_mb(field: str) -> Optional[float]:
    """A /proc/self/status memory field in MB (VmRSS: resident now, VmHWM: peak); None where there is no /proc."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    return None


def reset_peak() -> bool:
    """Reset the peak (VmHWM) to the current RSS (Linux >= 4.0: '5' to /proc/self/clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """Peak RSS in MB: VmHWM, or where there is no /proc the process's ru_maxrss (KiB on Linux, never reset)."""
    hwm = status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
