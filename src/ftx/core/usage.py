"""Resource accounting: wall time and sampled peak RSS of a block of work (this process + its children), and the
peak memory a training run reports."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Usage:
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0


@contextlib.contextmanager
def track_usage(interval: float = 0.2) -> Iterator[Usage]:
    """Wall time and sampled peak RSS (this process + its children) over a block."""
    import psutil

    usage = Usage()
    me = psutil.Process()
    stop = threading.Event()

    def rss() -> int:
        total = 0
        with contextlib.suppress(psutil.Error):
            total += me.memory_info().rss
            for c in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += c.memory_info().rss
        return total

    peak = [rss()]

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], rss())

    t = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    t.start()
    try:
        yield usage
    finally:
        stop.set()
        t.join()
        peak[0] = max(peak[0], rss())
        usage.wall_s = time.perf_counter() - start
        usage.peak_rss_mb = peak[0] / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set size. Linux: VmHWM, the high-water mark of this program's memory. Not
    getrusage's ru_maxrss: Linux carries that figure over from the parent across fork + exec, so a process started
    by a large one (a test runner holding models) reports the parent's peak as its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of this process on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()
