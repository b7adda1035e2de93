"""One supervisor for every serving engine (ftx.engines): start the engine on a private loopback port with a
private key, put ftx's gateway (ftx.gateway) in front of it on the public address, wait until both are
healthy, and always shut both down. Used by `ftx serve`, the recipe's serve stage, the Modelfile proof and the
benchmarks.

`ServeSettings` is the one shape of serving settings: the recipe's `serve:` section and serve configs
(serve/*.yaml, ftx.deploy.ServeSpec) both extend it. It has one section per registered engine
(`llamacpp:`, `vllm:`). The gateway binds 127.0.0.1 unless told otherwise and requires the API key (the
setting, else $FTX_API_KEY, else a random one) on every route but /health."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from .core.config import NOT_KEYED, InputPath
from .core.errors import FtxError
from .core.procs import Endpoint, api_key, free_port, launch, port_in_use, request_json, tail
from .engines import ENGINES


def _adapter_name(name: str) -> str:
    from .core.adapters import NAME_RE

    if not NAME_RE.match(name):
        raise ValueError(
            f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


AdapterName = Annotated[str, AfterValidator(_adapter_name)]


class _ServeBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    engine: Literal[tuple(ENGINES)] = Field(
        "llamacpp",
        description="llamacpp: a GGUF on llama-server; vllm: an HF base model with peft adapters on vLLM (multi-LoRA)",
    )
    host: str = Field(
        "127.0.0.1",
        description="address the gateway binds (0.0.0.0 to serve other machines; the key is still required)",
    )
    port: int = Field(
        0, ge=0, le=65535, description="the gateway's port; 0 picks a free one", json_schema_extra=NOT_KEYED
    )
    api_key: str | None = Field(
        None,
        description="required on every route but /health; default: $FTX_API_KEY, else a random key",
        json_schema_extra=NOT_KEYED,
    )
    startup_timeout_s: float | None = Field(
        None,
        gt=0,
        description="time allowed to load the model (default: the engine's, 180 s llama.cpp, 300 s vLLM)",
        json_schema_extra=NOT_KEYED,
    )
    adapters: dict[AdapterName, InputPath] = Field(
        default_factory=dict,
        description="more model names: GGUF LoRA files (llamacpp) or peft adapter directories (vllm)",
    )


ServeSettings = create_model(
    "ServeSettings",
    __base__=_ServeBase,
    __doc__="Serving settings shared by recipes and serve configs.",
    **{
        name: (e.settings, Field(default_factory=e.settings, description=f"{e.label} settings (engine: {name})"))
        for name, e in ENGINES.items()
    },
)


def check_adapter_kinds(doc, settings, loc: tuple) -> None:
    """Each adapter path is what the engine serves (a file or a directory); else file:line of the key."""
    engine = ENGINES[settings.engine]
    for n, p in settings.adapters.items():
        if (engine.adapter_kind == "dir") != Path(p).is_dir():
            raise doc.fail(
                (*loc, n),
                f"{engine.adapter_kind} not found: {p} ({engine.label} serves "
                f"{'peft adapter directories' if engine.adapter_kind == 'dir' else 'GGUF LoRA files'})",
            )


def endpoint_ports(host: str, port: int, raw: bool = False) -> tuple[int, str, int]:
    """(public port, engine host, engine port): the engine listens on a private loopback port behind the gateway,
    or on the public address itself when `raw`."""
    port = port or free_port(host)
    if port_in_use(host, port):
        raise FtxError(f"port {port} on {host} is already in use (serve.port)")
    return (port, host, port) if raw else (port, "127.0.0.1", free_port("127.0.0.1"))


def upstream(engine_ep: Endpoint, adapters: list[str] = ()) -> dict:
    """The gateway's description of the engine behind it (its config at start, the body of a swap): address, key,
    the base model's name and the adapter names it maps to llama-server ids (rewrite mode; none for passthrough)."""
    return {
        "upstream": engine_ep.base_url.removesuffix("/v1"),
        "upstream_key": engine_ep.api_key,
        "model": engine_ep.model,
        "adapters": list(adapters),
    }


@contextlib.contextmanager
def gateway(
    engine_ep: Endpoint, mode: str, host: str, port: int, key: str, log: Path, adapters: list[str] = ()
) -> Iterator[Endpoint]:
    """Start ftx.gateway on host:port in front of a running engine endpoint; yield the public endpoint."""
    gw = {**upstream(engine_ep, adapters), "api_key": key, "mode": mode, "host": host, "port": port}
    env = {**os.environ, "FTX_GATEWAY": json.dumps(gw)}  # keys travel in the environment, not argv or a file
    with launch(
        [sys.executable, "-m", "ftx.gateway"],
        host,
        port,
        key,
        engine_ep.model,
        log.with_name(log.name + ".gateway"),
        60,
        "ftx gateway",
        env=env,
    ) as ep:
        ep.engine = engine_ep.process
        yield ep


@contextlib.contextmanager
def start(
    settings,
    model: Path,
    name: str,
    log: Path,
    adapters: dict[str, Path] | None = None,
    raw: bool = False,
    extra_args: tuple[str, ...] = (),
    on_wait=None,
) -> Iterator[Endpoint]:
    """Serve `model` (a GGUF or an HF directory, as the engine serves) as model `name`, with `adapters` (default:
    settings.adapters) as more model names, behind the gateway; `raw`: the engine alone on settings.host:port
    (the template proof, benchmark baselines). Behind the gateway the endpoint's `swap(model, adapters)` replaces
    the engine while serving: a new engine process is started and checked healthy, the gateway sends new
    requests to it and waits for the old engine's running requests to finish, then the old engine is stopped."""
    t0 = time.perf_counter()
    engine = ENGINES[settings.engine]
    port, inner_host, inner_port = endpoint_ports(settings.host, settings.port, raw)
    key = api_key(settings.api_key)
    section = getattr(settings, engine.name)

    @contextlib.contextmanager
    def run_engine(model: Path, adapters: dict[str, Path], host: str, port: int, log: Path):
        checked = engine.check_adapters(adapters, model)
        if name in checked:
            raise FtxError(f"adapter name {name!r} is the base model's served name")
        inner_key = key if raw else secrets.token_hex(16)
        cmd = engine.command(section, model, name, checked, host, port, inner_key) + list(extra_args)
        timeout = settings.startup_timeout_s or engine.startup_timeout_s
        with launch(
            cmd, host, port, inner_key, name, log, timeout, engine.label, env=engine.env(section), on_wait=on_wait
        ) as ep:
            ep.info["adapters"] = list(checked) if engine.gateway == "rewrite" else []  # the names the gateway maps
            yield ep

    first = settings.adapters if adapters is None else adapters
    if raw:
        with run_engine(model, first, inner_host, inner_port, log) as ep:
            yield ep
        return
    current = contextlib.ExitStack()
    with contextlib.ExitStack() as outer:
        outer.callback(lambda: current.close())  # whichever engine serves at the end (after the gateway stops)
        ep = current.enter_context(run_engine(model, first, inner_host, inner_port, log))
        gw = outer.enter_context(gateway(ep, engine.gateway, settings.host, port, key, log, ep.info["adapters"]))
        swaps = {"n": 0}

        def swap(new_model: Path, new_adapters: dict[str, Path], drain_s: float = 600) -> dict:
            nonlocal current
            swaps["n"] += 1
            nxt = contextlib.ExitStack()
            try:
                new_log = log.with_name(f"{log.name}.swap-{swaps['n']}")
                nep = nxt.enter_context(
                    run_engine(new_model, new_adapters, "127.0.0.1", free_port("127.0.0.1"), new_log)
                )
                body = {**upstream(nep, nep.info["adapters"]), "drain_s": drain_s}
                result = request_json(gw.base_url, key, "POST", "/ftx/upstream", body, timeout=drain_s + 30)
            except BaseException:
                nxt.close()
                raise
            old, current = current, nxt
            gw.engine = nep.process
            old.close()  # drained (or past drain_s: then its last requests are cut off, and the result says so)
            return result

        gw.swap = swap
        gw.startup_s = time.perf_counter() - t0
        yield gw


def serve_forever(server, what: str, engine: str, log: Path, show_key: bool, reload=None) -> None:
    """`ftx serve`: enter `server` (a context manager yielding an Endpoint, e.g. `start(...)`), serve until Ctrl-C /
    SIGTERM, then shut the engine and the gateway down cleanly. `reload()` -> (model, adapters): on SIGHUP the
    engine is swapped for one serving those (Endpoint.swap: no request fails)."""
    from rich.console import Console

    console = Console(stderr=True)
    with contextlib.ExitStack() as stack:
        with console.status(f"loading {what} into {engine} ..."):
            ep = stack.enter_context(server)
        hold(ep, what, log, console, show_key, reload)
    console.print(f"{engine} stopped")


def hold(ep: Endpoint, what: str, log: Path, console, show_key: bool, reload=None) -> None:
    """Print how to reach a running endpoint (its key when ftx generated it), then wait until Ctrl-C / SIGTERM or
    until a process behind it dies (an error naming the log); on SIGHUP, swap the engine for what `reload()` says
    (a failed reload is reported and the running engine keeps serving)."""
    flags = {"stop": False, "reload": False}

    def on_signal(signum, frame):
        flags["stop" if signum == signal.SIGTERM else "reload"] = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        console.print(f"[green]ready[/] {ep.base_url}  model={ep.model}  serving {what}  (log: {log})")
        if show_key:
            console.print(f"api key (generated): {ep.api_key}")
        print(json.dumps({"base_url": ep.base_url, "model": ep.model}), flush=True)
        while not flags["stop"] and all(p.poll() is None for p in (ep.process, ep.engine) if p is not None):
            if flags["reload"] and reload and ep.swap:
                flags["reload"] = False
                try:
                    model, adapters = reload()
                    with console.status(f"SIGHUP: starting {Path(model).name} with {len(adapters)} adapters ..."):
                        result = ep.swap(model, adapters)
                    console.print(f"[green]reloaded[/] models {', '.join(result['models'])} (old engine drained)")
                    print(json.dumps({"reloaded": result["models"]}), flush=True)
                except (FtxError, OSError, ValueError) as e:
                    console.print(f"[red]reload failed, still serving the previous engine:[/] {e}")
            time.sleep(0.25)
        dead = next((p for p in (ep.process, ep.engine) if p is not None and p.poll() is not None), None)
        if dead is not None and not flags["stop"]:
            raise FtxError(f"the server exited with code {dead.returncode}: {tail(log)}")
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def chat(endpoint: Endpoint, messages: list[dict], max_tokens: int = 64, model: str | None = None) -> str:
    """One greedy chat completion (temperature 0) through the endpoint, as chat.Answer (its completion tokens,
    and truncated when the server says it stopped for length)."""
    from openai import OpenAI

    from .core.chat import Answer

    client = OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, max_retries=0, timeout=120)
    r = client.chat.completions.create(
        model=model or endpoint.model, messages=messages, max_tokens=max_tokens, temperature=0
    )
    tokens = r.usage.completion_tokens if r.usage else None
    return Answer.of((r.choices[0].message.content or "").strip(), tokens, r.choices[0].finish_reason == "length")
