"""Serve stage: an OpenAI-compatible endpoint, a GGUF on llama.cpp's llama-server (this module) or the base
model with LoRA adapters on vLLM (ftx.serve_vllm; the recipe picks with `serve.engine`, see `for_recipe`).

Why llama-server and not `python -m llama_cpp.server`: llama-server has parallel slots with continuous
batching; llama_cpp.server serializes every request behind one lock. Measured on this 2-core CPU with the
same Q8_0 file, llama-server gave 2.8-3.6x the aggregate throughput under concurrency (shared/notes).
Both come from the same llama-cpp-python sdist; llama-server is built once at install time.

Binds 127.0.0.1 unless told otherwise; `--api-key` (or FTX_API_KEY) is enforced by ftx's gateway (ftx.gateway)
on every route except /health; the engine behind it listens on a private loopback port with its own key.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import FtxError
from .serve_vllm import VllmEngine


class LlamaServerEngine(BaseModel):
    """llama-server's own settings (also the `llamacpp:` section of serve/*.yaml)."""
    model_config = ConfigDict(extra="forbid")
    parallel: int = Field(4, ge=1, description="llama-server slots (concurrent sequences)")
    ctx_size: int = Field(4096, ge=256, description="total context, split across slots")
    threads: int | None = None


class ServeConfig(LlamaServerEngine):
    """The recipe's `serve:` section (llama-server's settings at top level, vLLM's under `vllm:`)."""
    engine: Literal["llamacpp", "vllm"] = Field(
        "llamacpp", description="llamacpp: the exported GGUF on llama-server; vllm: the base model with this "
                                "recipe's adapter (and `adapters`) on vLLM, multi-LoRA")
    quant: str = Field("auto", description="llamacpp: which exported GGUF; auto: the one the export quality gate selected")
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    api_key: str | None = Field(None, description="default: $FTX_API_KEY, else a random key per run")
    startup_timeout_s: float | None = Field(None, gt=0, description="default: 180 s llama.cpp, 300 s vLLM")
    check_prompts: int = Field(8, ge=0, description="held-out prompts sent through the endpoint")
    adapters: dict[str, Path] = Field(default_factory=dict, description="more model names: GGUF LoRA files "
                                      "(llamacpp) or peft adapter directories (vllm), relative to the recipe")
    vllm: VllmEngine = VllmEngine()


class ServeResult(BaseModel):
    model: str
    gguf: str | None = Field(description="llamacpp: the GGUF served")
    engine: Literal["llamacpp", "vllm"] = "llamacpp"
    base: str | None = Field(None, description="vllm: the base model's served name (the adapter is `model`)")
    adapters: list[str] = Field(default_factory=list, description="every adapter name the endpoint answers to")
    startup_s: float
    prompts: int
    format_rate: float | None
    exact_rate: float
    samples: list[dict]


@dataclass
class Endpoint:
    base_url: str
    api_key: str
    model: str
    process: subprocess.Popen
    log: Path
    engine: subprocess.Popen | None = None  # behind a gateway: the engine process


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise FtxError(f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                       f"or digit")


def check_gguf_lora(name: str, path: Path, base_gguf: Path) -> Path:
    """A GGUF LoRA adapter for `base_gguf`: valid name, complete GGUF file, general.type adapter, same arch."""
    from .export import check_gguf

    check_name(name)
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FtxError(f"adapter {name!r}: no such file", where=str(path))
    check_gguf(p)
    meta = {}
    for f in (p, base_gguf):
        from gguf import GGUFReader

        r = GGUFReader(f)
        meta[f] = {k: r.fields[k].contents() for k in ("general.type", "general.architecture") if k in r.fields}
    if meta[p].get("general.type") != "adapter":
        raise FtxError(f"adapter {name!r}: not a GGUF LoRA adapter (general.type {meta[p].get('general.type')!r})",
                       where=str(p))
    if meta[p].get("general.architecture") != meta[base_gguf].get("general.architecture"):
        raise FtxError(f"adapter {name!r}: architecture {meta[p].get('general.architecture')!r} does not match "
                       f"the base model's {meta[base_gguf].get('general.architecture')!r}", where=str(p))
    return p


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


def _health(base: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def _tail(log: Path, n: int = 3) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return " | ".join(lines[-n:]) or "no output"


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the ftx process dies, however it dies (SIGKILL included), so
    no engine or gateway outlives it. Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@contextlib.contextmanager
def launch(cmd: list[str], host: str, port: int, key: str, model_name: str, log: Path, timeout_s: float,
           engine: str, env: dict | None = None, on_wait=None) -> Iterator[Endpoint]:
    """Start an engine process, wait until its /health is 200, yield the endpoint, always shut it down."""
    if port_in_use(host, port):
        raise FtxError(f"port {port} on {host} is already in use (serve.port)")
    log.parent.mkdir(parents=True, exist_ok=True)
    logf = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env, preexec_fn=_die_with_parent)
    base = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while _health(base) != 200:
            if proc.poll() is not None:
                raise FtxError(f"{engine} exited with code {proc.returncode} while loading {model_name}: {_tail(log)}")
            if time.monotonic() > deadline:
                raise FtxError(f"{engine} not ready after {timeout_s:.0f}s (startup_timeout_s); log: {log}")
            if on_wait:
                on_wait()
            time.sleep(0.25)
        yield Endpoint(base_url=f"{base}/v1", api_key=key, model=model_name, process=proc, log=log)
    finally:
        stop(proc)
        logf.close()


def endpoint_ports(host: str, port: int, raw: bool = False) -> tuple[int, str, int]:
    """(public port, engine host, engine port): the engine listens on a private loopback port behind the gateway,
    or on the public address itself when `raw`."""
    port = port or free_port(host)
    if port_in_use(host, port):
        raise FtxError(f"port {port} on {host} is already in use (serve.port)")
    return (port, host, port) if raw else (port, "127.0.0.1", free_port("127.0.0.1"))


def api_key(configured: str | None) -> str:
    return configured or os.environ.get("FTX_API_KEY") or f"ftx-{secrets.token_hex(16)}"


@contextlib.contextmanager
def gateway(engine_ep: Endpoint, engine: str, host: str, port: int, key: str, log: Path,
            adapters: list[str] = ()) -> Iterator[Endpoint]:
    """Start ftx.gateway on host:port in front of a running engine endpoint; yield the public endpoint."""
    upstream = engine_ep.base_url.removesuffix("/v1")
    gw = {"upstream": upstream, "upstream_key": engine_ep.api_key, "api_key": key, "engine": engine,
          "model": engine_ep.model, "adapters": list(adapters), "host": host, "port": port}
    env = {**os.environ, "FTX_GATEWAY": json.dumps(gw)}
    with launch([sys.executable, "-m", "ftx.gateway"], host, port, key, engine_ep.model,
                log.with_name(log.name + ".gateway"), 60, "ftx gateway", env=env) as ep:
        ep.engine = engine_ep.process
        yield ep


@contextlib.contextmanager
def running(cfg: ServeConfig, gguf: Path, model_name: str, log: Path, on_wait=None,
            extra_args: tuple[str, ...] = (), raw: bool = False) -> Iterator[Endpoint]:
    """Start llama-server for `gguf` (+ GGUF LoRA adapters) and ftx's gateway in front of it (ftx.gateway),
    wait until both are healthy, yield the gateway's endpoint, always shut both down. `raw`: llama-server
    alone on cfg.host:cfg.port (the template proof, the overhead benchmark's baseline)."""
    from . import llamacpp

    from .export import check_gguf

    check_gguf(gguf)
    loras = {n: check_gguf_lora(n, p, gguf) for n, p in cfg.adapters.items()}
    if model_name in loras:
        raise FtxError(f"adapter name {model_name!r} is the base model's served name")
    port, inner_host, inner_port = endpoint_ports(cfg.host, cfg.port, raw)
    key = api_key(cfg.api_key)
    inner_key = key if raw else secrets.token_hex(16)
    cmd = [str(llamacpp.tool("llama-server")), "-m", str(gguf), "--host", inner_host, "--port", str(inner_port),
           "-np", str(cfg.parallel), "-c", str(cfg.ctx_size), "--alias", model_name, "--metrics",
           "--api-key", inner_key, "--no-webui"]
    if cfg.threads:
        cmd += ["-t", str(cfg.threads)]
    for p in loras.values():
        cmd += ["--lora", str(p)]
    if loras:
        cmd += ["--lora-init-without-apply"]
    cmd += list(extra_args)
    with launch(cmd, inner_host, inner_port, inner_key, model_name, log, cfg.startup_timeout_s or 180, "llama-server",
                on_wait=on_wait) as engine:
        if raw:
            yield engine
            return
        with gateway(engine, "llamacpp", cfg.host, port, key, log, list(loras)) as ep:
            yield ep


@contextlib.contextmanager
def for_recipe(cfg: ServeConfig, name: str, gguf: Path | None, base_dir: Path, base_model: str, adapter: Path,
               log: Path) -> Iterator[tuple[Endpoint, dict]]:
    """The recipe's serve stage. llamacpp: the exported GGUF as model `name` (cfg.adapters: more model names,
    GGUF LoRA files). vllm: the base model with this recipe's adapter, unmerged, as model `name` (cfg.adapters:
    more model names, peft directories), so requests for `name` go through vLLM's LoRA path. Yields the
    gateway's endpoint (its `model` is `name`) and the fields of the ServeResult that describe what is served."""
    if cfg.engine == "llamacpp":
        with running(cfg, gguf, name, log) as ep:
            yield ep, {"model": name, "gguf": gguf.name, "engine": "llamacpp", "adapters": list(cfg.adapters)}
        return
    from . import serve_vllm

    if name in cfg.adapters:
        raise FtxError(f"serve.adapters.{name}: this name is the recipe's own adapter; pick another")
    base_name = Path(base_model).name
    base_name = f"{base_name}-base" if base_name == name or base_name in cfg.adapters else base_name
    vcfg = serve_vllm.config(cfg.vllm, cfg.host, cfg.port, cfg.api_key, cfg.startup_timeout_s)
    adapters = {name: adapter, **cfg.adapters}
    with serve_vllm.running(vcfg, base_dir, base_name, adapters, log) as ep:
        yield replace(ep, model=name), {"model": name, "gguf": None, "engine": "vllm",
                                                    "base": base_name, "adapters": list(adapters)}


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
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


def chat(endpoint: Endpoint, messages: list[dict], max_tokens: int = 64) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0, timeout=120)
    r = client.chat.completions.create(model=endpoint.model, messages=messages, max_tokens=max_tokens, temperature=0)
    return (r.choices[0].message.content or "").strip()


def check(endpoint: Endpoint, heldout: list[list[dict]], regex: str | None, max_tokens: int) -> dict:
    """Send held-out prompts through the endpoint: does the served model show the fine-tuned behaviour?"""
    from .eval import exact_rate, format_rate

    prompts, refs = [m[:-1] for m in heldout], [m[-1]["content"] for m in heldout]
    outs = [chat(endpoint, p, max_tokens) for p in prompts]
    return {
        "prompts": len(prompts), "format_rate": format_rate(regex, outs), "exact_rate": exact_rate(outs, refs),
        "samples": [{"prompt": p[-1]["content"], "reference": r, "served": o} for p, r, o in zip(prompts, refs, outs)],
    }


def serve_forever(server, what: str, engine: str, generated_key: bool, log: Path) -> None:
    """`ftx serve`: enter `server` (a context manager yielding an Endpoint: `running(...)` or
    `serve_vllm.running(...)`), run until Ctrl-C / SIGTERM, then shut the engine down cleanly."""
    from rich.console import Console

    console = Console(stderr=True)
    stopping = {"flag": False}

    def on_signal(signum, frame):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    with contextlib.ExitStack() as stack:
        with console.status(f"loading {what} into {engine} ..."):
            ep = stack.enter_context(server)
        try:
            console.print(f"[green]ready[/] {ep.base_url}  model={ep.model}  (log: {log})")
            if generated_key:
                console.print(f"api key (generated): {ep.api_key}")
            console.print(json.dumps({"base_url": ep.base_url, "model": ep.model}))
            procs = [p for p in (ep.process, ep.engine) if p is not None]
            while not stopping["flag"] and all(p.poll() is None for p in procs):
                time.sleep(0.5)
            dead = next((p for p in procs if p.poll() is not None), None)
            if dead is not None and not stopping["flag"]:
                raise FtxError(f"{engine} exited with code {dead.returncode}: {_tail(log)}")
        except KeyboardInterrupt:
            pass
        finally:
            stack.close()  # stops the engine
            console.print(f"{engine} stopped")
