"""`ftx plan [RECIPE.yaml | MODEL] [key=value ...]`: will this fine-tune fit in memory?"""

from __future__ import annotations

import sys

import click

from ..plan import PlanConfig
from .grammar import Alias, console, options, overrides

ALIASES = [
    Alias("--model", "model", raw=True),
    Alias("--method", "method"),
    Alias("--seq-len", "seq_len"),
    Alias("--batch", "batch_size"),
    Alias("--lora-r", "lora_r"),
    Alias("--gradient-checkpointing", "gradient_checkpointing", is_flag=True),
    Alias("--device", "device"),
    Alias("--budget-gb", "budget_gb"),
]


@click.command()
@click.argument("args", nargs=-1)
@options(PlanConfig, ALIASES)
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def plan(args, as_json, **params):
    """Estimate peak training memory for a recipe (its train settings) or a model (a known name or a directory)
    and say whether it fits the budget; exit 1 when it does not. Formulas: docs/memory_planner.md."""
    from rich.table import Table

    from ..core import config
    from ..plan import machine, recipe_plan_config
    from ..plan import plan as make_plan

    args, base, note = list(args), [], None
    if args and "=" not in args[0]:
        source = args.pop(0)
        if source.endswith((".yaml", ".yml")):  # the key=value words are the recipe's
            from ..pipeline import load

            device = machine(params["device"] or PlanConfig.model_fields["device"].default, 1.0)[0]
            recipe = load(source, args)
            base = [(k, v, source) for k, v in recipe_plan_config(recipe, device).items()]
            note, seq = _data_seq_len(recipe)
            base += [("seq_len", seq, source)] if seq else []
            args = []
        else:
            base = [("model", source, source)]
    cfg = config.load(None, PlanConfig, [*base, *args, *overrides(ALIASES, params)], what="plan arguments").model
    p = make_plan(cfg)
    if as_json:
        click.echo(p.model_dump_json(indent=2))
    else:
        c = p.config
        click.echo(
            f"{c.model}: {c.method}, seq {c.seq_len} x batch {c.batch_size}, LoRA r {c.lora_r}, {c.device}"
            f"{', gradient checkpointing' if c.gradient_checkpointing else ''}"
        )
        table = Table()
        table.add_column("term")
        table.add_column("MiB", justify="right")
        for k, v in p.terms_mb.items():
            table.add_row(k, f"{v:,.0f}")
        table.add_row("[bold]total", f"[bold]{p.total_mb:,.0f}")
        table.add_row("budget", f"{p.budget_mb:,.0f}")
        console().print(table)
        verdict = "fits" if p.fits else "does NOT fit"
        click.echo(
            f"{p.params / 1e9:.2f}B params, {p.trainable_params / 1e6:.1f}M trainable; "
            f"{p.total_mb / 1024:.1f} GiB {verdict} in {c.budget_gb:.1f} GiB; largest batch that fits: "
            f"{p.max_batch_size}"
        )
        if note:
            click.echo(note)
    sys.exit(0 if p.fits else 1)


def _data_seq_len(recipe) -> tuple[str | None, int | None]:
    """seq_len from the data's real lengths (batches are padded to their longest row), with a note; the worst case
    (every row at max_seq_len) when the data or the tokenizer is not here."""
    from ..core.errors import FtxError
    from ..plan import batch_seq_len, data_lengths

    try:
        lengths = sorted(data_lengths(recipe))
    except (FtxError, OSError) as e:
        return f"seq_len: every row at data.max_seq_len (the worst case; data lengths unavailable: {e})", None
    seq = batch_seq_len(lengths, recipe.train.batch_size)
    return (
        f"seq_len {seq}: the expected longest row of a batch of {recipe.train.batch_size} from the data "
        f"({len(lengths)} rows: median {lengths[len(lengths) // 2]}, max {lengths[-1]} tokens; "
        f"data.max_seq_len {recipe.data.max_seq_len}). Every row at max_seq_len: plan with "
        f"--seq-len {recipe.data.max_seq_len}."
    ), seq


COMMANDS = [plan]
