"""`ftx doctor`: is everything ftx needs here? Exit 1 when something required is missing."""

from __future__ import annotations

import sys

import click

from .grammar import console


@click.command()
def doctor():
    """Check the environment: packages (importable), llama.cpp tools, the Go template renderer, the quickstart
    model, the accelerator."""
    from rich.table import Table

    from ..doctor import checks

    table = Table(title="ftx doctor")
    for col in ("check", "status", "detail"):
        table.add_column(col)
    ok = True
    for c in checks():
        ok &= c.ok or not c.required
        status = "[green]ok[/]" if c.ok else ("[red]missing[/]" if c.required else "[yellow]optional[/]")
        table.add_row(c.name, status, c.detail)
    console().print(table)
    sys.exit(0 if ok else 1)


COMMANDS = [doctor]
