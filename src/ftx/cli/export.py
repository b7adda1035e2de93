"""`ftx export` (HF model directory -> GGUF ladder, quality gate, proven Modelfile) and `ftx modelfile`."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import FtxError
from ..packaging.modelfile import ModelfileJob
from ..stages.export import ExportJob
from .grammar import Alias, abs_path, console, load, options


def _imatrix(texts):
    return [("calibration", str(Path(texts[0]).absolute())), ("gguf.imatrix", True)]


def _lora(texts):
    return [("adapter", str(Path(texts[0]).absolute())), ("lora_adapter", True)]


PATHS = [Alias(f"--{k}", k, parse=abs_path(k)) for k in ("model", "val", "heldout", "out")]
EXPORT = [
    *PATHS,
    Alias("--name", "name", raw=True),
    Alias("--quant", "gguf.quants", multiple=True),
    Alias("--num-ctx", "modelfile.num_ctx"),
    Alias("--bundle", "bundle", parse=abs_path("bundle")),
    Alias("--max-mean-kld", "quality_gate.max_mean_kld"),
    Alias("--max-ppl-ratio", "quality_gate.max_ppl_ratio"),
    Alias("--no-gate", "quality_gate", is_flag=True, value=None, help="keep every quant, select the smallest"),
    Alias(
        "--imatrix",
        "calibration",
        parse=_imatrix,
        metavar="TRAIN.jsonl",
        help="quantize with an importance matrix computed on these conversations",
    ),
    Alias(
        "--lora-adapter",
        "adapter",
        parse=_lora,
        metavar="DIR",
        help="also export this peft adapter as a GGUF LoRA (needs --base)",
    ),
    Alias("--base", "base", raw=True),
]
MODELFILE = [Alias(f"--{k}", k, parse=abs_path(k)) for k in ("model", "gguf", "adapter", "out")] + [
    Alias("--name", "name", raw=True),
    Alias("--num-ctx", "num_ctx"),
]


@click.command()
@click.argument("args", nargs=-1)
@options(ExportJob, EXPORT)
def export(args, **params):
    """HF model directory -> reference GGUF -> quantized GGUFs (quality gate) + proven Modelfile."""
    from ..core import basemodel
    from ..core.cache import atomic_dir
    from ..stages.export import export as run

    job = load(ExportJob, args, EXPORT, params, "export arguments").model
    if job.lora_adapter and not job.base:
        raise click.UsageError("--lora-adapter needs --base")
    with atomic_dir(job.out) as tmp:
        r = run(
            job,
            job.model,
            job.val,
            job.name,
            None,
            tmp,
            heldout_file=job.heldout,
            base_dir=basemodel.resolve(job.base) if job.base else None,
            adapter_dir=job.adapter,
            calib_file=job.calibration,
        )
        (tmp / "export.json").write_text(r.model_dump_json(indent=2))
    click.echo(r.model_dump_json(indent=2))
    if job.bundle:
        from .. import bundle

        click.echo(f"bundle: {bundle.from_export(job, r)['dir']}")


@click.command()
@click.argument("args", nargs=-1)
@options(ModelfileJob, MODELFILE)
def modelfile(args, **params):
    """Write an Ollama Modelfile whose TEMPLATE is proven: HF template, Go template and llama.cpp agree."""
    from rich.table import Table
    from transformers import AutoTokenizer

    from ..packaging import modelfile as mf

    job = load(ModelfileJob, args, MODELFILE, params, "modelfile arguments").model
    out = job.out or job.gguf.parent / "Modelfile"
    rt = mf.runtime(job.model, job.num_ctx, job.parameters, None)
    tok = AutoTokenizer.from_pretrained(job.model)
    proof = mf.write(
        tok, job.model, job.gguf, job.name, rt["num_ctx"], out, adapter=job.adapter, parameters=rt["parameters"]
    )
    table = Table(title=f"template proof: {proof.family or 'no family proven'}")
    for col in ("conversation", "HF = Go = llama.cpp", "tokens", "detail"):
        table.add_column(col)
    for r in proof.rows:
        table.add_row(r.conversation, r.status, str(r.tokens or ""), r.detail or "")
    console().print(table)
    if not proof.proven:
        raise FtxError(f"no Modelfile written: {proof.reason}", where=str(job.model))
    click.echo(str(out))


COMMANDS = [export, modelfile]
