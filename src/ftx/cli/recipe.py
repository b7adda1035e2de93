"""`ftx recipe run|validate|schema`, and `ftx train|dpo` (a recipe run up to that stage; `ftx eval` in eval.py)."""

from __future__ import annotations

from pathlib import Path

import click

from .grammar import config_and_overrides, console

STAGE_HELP = "a stage: data, train, dpo, eval, merge, export, serve, bench (ftx.pipeline)"


def _stage_name(ctx, param, value):
    from ..pipeline import NAMES

    for v in value if isinstance(value, tuple) else [value]:
        if v is not None and v not in (*NAMES, "all"):
            raise click.BadParameter(f"{v!r}; stages: {', '.join(NAMES)}")
    return value


@click.group()
def recipe():
    """Run or check a whole pipeline from one YAML file."""


@recipe.command("run")
@click.argument("args", nargs=-1)
@click.option(
    "--force",
    multiple=True,
    callback=_stage_name,
    metavar="STAGE",
    help=f"re-run this stage and everything after it even if cached ({STAGE_HELP}, or all)",
)
@click.option("--until", default=None, callback=_stage_name, metavar="STAGE", help="stop after this stage")
@click.option("--serve", is_flag=True, help="then keep the serve stage's endpoint up until Ctrl-C")
def recipe_run(args, force, until, serve):
    """Run RECIPE.yaml [key.path=value ...], e.g. `ftx recipe run recipes/quickstart.yaml train.max_steps=20`."""
    from ..runner import run_recipe

    path, overrides = _recipe(args)
    run_dir = run_recipe(path, tuple(overrides), force=force, until=until, console=console(), serve=serve)
    click.echo(str(run_dir / "run_card.md"))


def _recipe(args) -> tuple[Path, list[str]]:
    path, overrides = config_and_overrides(args)
    if path is None:
        raise click.UsageError("give the recipe: ftx recipe run RECIPE.yaml [key.path=value ...]")
    return path, overrides


@recipe.command("validate")
@click.argument("args", nargs=-1)
def recipe_validate(args):
    """Validate RECIPE.yaml [key.path=value ...], print the resolved config (every path resolved, defaults filled)
    and check what can be checked without running: the base model is here, the output can be written, the tools
    its stages use are installed (exit 2 naming the first that is not)."""
    from rich.table import Table

    from .. import pipeline
    from ..core.errors import FtxError
    from ..doctor import recipe_checks

    path, overrides = _recipe(args)
    recipe = pipeline.load(path, overrides)
    click.echo(recipe.model_dump_json(indent=2))
    checks = recipe_checks(recipe)
    table = Table(title=f"{path}: ready to run?")
    for col in ("check", "status", "detail"):
        table.add_column(col)
    for c in checks:
        table.add_row(c.name, "[green]ok[/]" if c.ok else "[red]missing[/]", c.detail)
    console().print(table)
    bad = next((c for c in checks if not c.ok and c.required), None)
    if bad:
        raise FtxError(f"{bad.name}: {bad.detail}", where=str(path))


@recipe.command("schema")
def recipe_schema():
    """Print the recipe reference (markdown), generated from the models' field descriptions."""
    from ..pipeline import Recipe
    from ..schema_doc import reference

    click.echo(reference(Recipe, "Recipe reference"), nl=False)


def _until(stage: str, name: str | None = None):
    @click.argument("args", nargs=-1)
    @click.option("--force", is_flag=True, help=f"re-run {stage} even if cached")
    def cmd(args, force, print_launch=False, k8s_job=None):
        from ..runner import launch_commands, run_recipe, train_job

        path, overrides = _recipe(args)
        if k8s_job:
            click.echo(train_job(path, tuple(overrides), k8s_job, console()))
            return
        if print_launch:
            for node, line in enumerate(launch_commands(path, tuple(overrides), console())):
                click.echo(f"# node {node}\n{line}")
            return
        run_dir = run_recipe(path, tuple(overrides), force=(stage,) if force else (), until=stage, console=console())
        click.echo(str(run_dir / "run_card.md"))

    cmd.__doc__ = f"Run RECIPE.yaml [key=value ...] up to and including the {stage} stage (cached stages reused)."
    return click.command(name or stage)(cmd)


train = _until("train")
train.params += [
    click.Option(
        ["--print-launch"],
        is_flag=True,
        help="print every node's torchrun/accelerate command for train.distributed and exit (nothing is trained)",
    ),
    click.Option(
        ["--k8s-job"],
        type=click.Path(dir_okay=False, path_type=Path),
        help="write a Kubernetes Indexed Job + headless Service for train.distributed to this file and exit",
    ),
]


COMMANDS = [recipe, train, _until("dpo")]  # `ftx eval` is a group: ftx.cli.eval
