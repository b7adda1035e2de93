"""Small helpers shared by the stages: hashing, atomic writes, cache location, resource tracking."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


def cache_root() -> Path:
    """Machine-wide cache for converted base models and built llama.cpp tools (FTX_CACHE overrides)."""
    return Path(os.environ.get("FTX_CACHE", Path.home() / ".cache" / "ftx"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: Path) -> str:
    """Content hash of a file or of every file under a directory (names and bytes)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """Hash of a JSON-serializable object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir next to `final`; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


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


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def train_dtype(device: str):
    """fp32 on CPU (bf16 matmuls are ~100x slower there), bf16 on CUDA."""
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


@contextlib.contextmanager
def redirect_fds(log: Path) -> Iterator[None]:
    """Send C-level stdout/stderr (llama.cpp's logging) to `log` for the duration of the block."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
