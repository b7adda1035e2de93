"""`ftx serve [CONFIG.yaml] [key=value ...]` (until Ctrl-C), `ftx serve k8s CONFIG`, `ftx serve adapters ...`."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..deploy import ServeSpec
from .grammar import Alias, DefaultGroup, abs_path, console, load, named, options

ALIASES = [
    Alias("--engine", "engine"),
    Alias("--gguf", "gguf", parse=abs_path("gguf")),
    Alias("--base", "base_model", raw=True),
    Alias("--name", "name", raw=True),
    Alias(
        "--adapter",
        "adapters",
        multiple=True,
        parse=named("adapters"),
        metavar="NAME=PATH",
        help="an adapter served as model NAME (repeatable): llamacpp a GGUF LoRA file, vllm a peft directory",
    ),
    Alias("--host", "host", raw=True),
    Alias("--port", "port"),
    Alias("--api-key", "api_key", raw=True),
    Alias("--parallel", "llamacpp.parallel"),
    Alias("--ctx-size", "llamacpp.ctx_size"),
    Alias("--threads", "llamacpp.threads"),
    Alias("--max-model-len", "vllm.max_model_len"),
    Alias("--max-loras", "vllm.max_loras"),
    Alias("--log", "log", parse=abs_path("log")),
]


@click.group(cls=DefaultGroup, default="run")
def serve():
    """Serve an OpenAI-compatible endpoint (`ftx serve [CONFIG.yaml] [key=value] [--flags]`, see `ftx serve run -h`),
    render Kubernetes manifests (`k8s`), manage a running vLLM server's adapters (`adapters`)."""


@serve.command("run")
@click.argument("args", nargs=-1)
@options(ServeSpec, ALIASES)
def serve_run(args, **params):
    """Serve until Ctrl-C: a GGUF on llama-server, or a base model with LoRA adapters on vLLM, from a serve config
    (serve/*.yaml; paths relative to it), key=value overrides and flags (paths relative to here). On SIGHUP the
    config is read again and a new engine with its model and adapters replaces the running one without a failed
    request (started, then the gateway switches and drains the old one)."""
    from .. import deploy, serving
    from ..engines import ENGINES

    def read():
        spec = deploy.local(load(ServeSpec, args, ALIASES, params, "serve config", resolve=False))
        return spec, deploy.served_model(spec)

    spec, model = read()
    engine = ENGINES[spec.engine]
    if engine.serves == "gguf":
        name, what = spec.name or _gguf_name(spec.gguf), model.name
    else:
        name, what = spec.name or Path(model).name, f"{spec.base_model} + {len(spec.adapters)} adapters"
    log = spec.log or Path(f"{name}.server.log").absolute()
    show_key = not (spec.api_key or os.environ.get("FTX_API_KEY"))

    def reload():  # SIGHUP: the config file read again (same flags), its model and adapters swapped in
        new, new_model = read()
        if new.engine != spec.engine:
            raise ValueError(f"the engine cannot change on reload ({spec.engine} -> {new.engine}): restart instead")
        return new_model, new.adapters

    serving.serve_forever(serving.start(spec, model, name, log), what, engine.label, log, show_key, reload)


def _gguf_name(gguf: Path) -> str:
    """The model's name from the GGUF's metadata (general.name), else the file's stem."""
    from ..core.gguf import fields

    return str(fields(gguf, ("general.name",)).get("general.name") or gguf.stem)


@serve.command("k8s")
@click.argument("args", nargs=-1)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write here (default: stdout)")
@click.option("--k8s-version", default=None, help="validate against this Kubernetes release's schemas [1.33]")
def serve_k8s(args, out, k8s_version):
    """Render Kubernetes manifests (Deployment with GPUs, probes, gateway sidecar; Service) from a vLLM serve
    CONFIG [key=value ...], validated against the Kubernetes schemas."""
    from .. import deploy
    from ..core.cache import atomic_write_text

    doc = load(ServeSpec, args, [], {}, "serve config", resolve=False)
    docs = deploy.render(doc, k8s_version or deploy.K8S_VERSION)
    text = deploy.to_yaml(docs)
    if out:
        atomic_write_text(out, text)
        console().print(deploy.instructions(doc.model, out, k8s_version or deploy.K8S_VERSION))
    else:
        click.echo(text, nl=False)


@serve.group()
def adapters():
    """LoRA adapters of a running vLLM server (hot load / unload)."""


def _server(f):
    f = click.option("--url", default="http://127.0.0.1:8080/v1", show_default=True, help="the server's base URL")(f)
    return click.option("--api-key", envvar="FTX_API_KEY", default=None, help="[env FTX_API_KEY]")(f)


@adapters.command("list")
@_server
def adapters_list(url, api_key):
    """Models the server answers to: the base and its adapters."""
    from ..engines.vllm import list_adapters

    for m in list_adapters(url, api_key):
        click.echo(f"{m['name']}\t{'adapter of ' + m['parent'] if m['parent'] else 'base'}\t{m['root'] or ''}")


@adapters.command("add")
@click.argument("name")
@click.argument("path", type=click.Path(path_type=Path))
@_server
def adapters_add(name, path, url, api_key):
    """Load the peft adapter at PATH as model NAME (checked against the server's base model first)."""
    from ..engines.vllm import add_adapter

    click.echo(f"loaded {name} from {add_adapter(url, api_key, name, path)}")


@adapters.command("remove")
@click.argument("name")
@_server
def adapters_remove(name, url, api_key):
    """Unload adapter NAME."""
    from ..engines.vllm import remove_adapter

    remove_adapter(url, api_key, name)
    click.echo(f"removed {name}")


COMMANDS = [serve]
