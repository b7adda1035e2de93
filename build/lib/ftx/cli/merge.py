"""`ftx merge`: fold a LoRA adapter (or a weighted combination of several) into its base and verify the logits."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import click
from pydantic import Field

from ..core.config import InputDir, InputFile
from ..stages.merge import MergeConfig
from .grammar import Alias, abs_path, load, options


class MergeJob(MergeConfig):
    base: str = Field(description="base model: a packaged name or an HF directory")
    adapter: InputDir = Field(description="the peft adapter to merge")
    val: InputFile = Field(description="JSONL conversations for the equivalence check")
    out: Path = Field(description="output directory (merged/ and merge.json)")
    method: Literal["lora", "qlora"] = Field(
        "lora",
        description="qlora: the adapter was trained on the NF4 base; report merged vs the 4-bit training-time model",
    )


def _combine(texts: list[str]):
    adapters = []
    for spec in texts:
        path, _, w = spec.rpartition(":") if ":" in spec else (spec, "", "1")
        try:
            adapters.append({"path": str(Path(path).absolute()), "weight": float(w)})
        except ValueError:
            raise click.BadParameter(f"{spec!r}: expected DIR or DIR:WEIGHT", param_hint="--combine") from None
    return [("combine.adapters", adapters)]


ALIASES = [
    Alias("--base", "base", raw=True),
    Alias("--adapter", "adapter", parse=abs_path("adapter")),
    Alias("--val", "val", parse=abs_path("val")),
    Alias("--out", "out", parse=abs_path("out")),
    Alias("--max-logit-diff", "max_logit_diff"),
    Alias("--qlora", "method", is_flag=True, value="qlora"),
    Alias("--weight", "combine.weight"),
    Alias(
        "--combine",
        "combine.adapters",
        multiple=True,
        parse=_combine,
        metavar="DIR[:WEIGHT]",
        help="another adapter to add (weighted combination; repeatable)",
    ),
    Alias("--combination", "combine.method"),
]


@click.command()
@click.argument("args", nargs=-1)
@options(MergeJob, ALIASES)
def merge(args, **params):
    """Merge a LoRA adapter (or several, weighted) into its base (fp32 on CPU) and verify the logits."""
    from ..core import basemodel
    from ..core.cache import atomic_dir
    from ..stages.merge import merge as run

    job = load(MergeJob, args, ALIASES, params, "merge arguments").model
    with atomic_dir(job.out) as tmp:
        r = run(job, basemodel.resolve(job.base), job.adapter, job.val, tmp, method=job.method)
        (tmp / "merge.json").write_text(r.model_dump_json(indent=2))
    click.echo(r.model_dump_json(indent=2))


COMMANDS = [merge]
