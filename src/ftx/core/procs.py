"""Process supervision for servers: free ports, API keys, start a process and wait until its /health answers 200,
stop its whole process group, and make children die with ftx (however ftx dies)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FtxError


@dataclass
class Endpoint:
    base_url: str  # http://host:port/v1
    api_key: str
    model: str
    process: subprocess.Popen
    log: Path
    engine: subprocess.Popen | None = None  # behind a gateway: the engine process
    startup_s: float = 0.0
    info: dict = field(default_factory=dict)  # what the endpoint serves, for reports
    # behind a gateway: swap(model, adapters) replaces the engine while serving (ftx.serving.start)
    swap: object | None = None


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def api_key(configured: str | None) -> str:
    """The configured key, else $FTX_API_KEY, else a random one."""
    return configured or os.environ.get("FTX_API_KEY") or f"ftx-{secrets.token_hex(16)}"


def health(base: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def request_json(base_url: str, api_key: str | None, method: str, path: str, body: dict | None = None, timeout=120):
    """One request to a server's `path` (under base_url without its /v1), JSON in and out (text when the answer is
    not JSON); HTTP errors and an unreachable server become one-line FtxErrors."""
    url = base_url.rstrip("/").removesuffix("/v1") + path
    req = urllib.request.Request(
        url,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        raise FtxError(f"{method} {url}: HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise FtxError(f"{url}: server not reachable ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def tail(log: Path, n: int = 3) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return " | ".join(lines[-n:]) or "no output"


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the ftx process dies, however it dies (SIGKILL included), so
    no engine or gateway outlives it. Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM to the process group, SIGKILL after `timeout` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def launch(
    cmd: list[str],
    host: str,
    port: int,
    key: str,
    model_name: str,
    log: Path,
    timeout_s: float,
    what: str,
    env: dict | None = None,
    on_wait=None,
) -> Iterator[Endpoint]:
    """Start a server process, wait until its /health is 200, yield the endpoint, always shut it down."""
    if port_in_use(host, port):
        raise FtxError(f"port {port} on {host} is already in use (serve.port)")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            preexec_fn=die_with_parent,
        )
        base = f"http://{host}:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while health(base) != 200:
                if proc.poll() is not None:
                    raise FtxError(f"{what} exited with code {proc.returncode} while loading {model_name}: {tail(log)}")
                if time.monotonic() > deadline:
                    raise FtxError(f"{what} not ready after {timeout_s:.0f}s (startup_timeout_s); log: {log}")
                if on_wait:
                    on_wait()
                time.sleep(0.25)
            yield Endpoint(
                base_url=f"{base}/v1",
                api_key=key,
                model=model_name,
                process=proc,
                log=log,
                startup_s=time.perf_counter() - t0,
            )
        finally:
            stop(proc)
