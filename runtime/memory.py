"""Memory readings of the current process."""

from __future__ import annotations

import resource
import sys

import psutil


def process_memory() -> tuple[int, int]:
    """Return (current RSS, peak RSS) of this process in bytes."""
    rss = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    return rss, max(rss, peak_bytes)
