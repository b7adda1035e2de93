"""ftx command line: a thin click dispatcher over one grammar (ftx.cli.grammar). Each verb is a small module
here; heavy imports happen inside the commands, so `ftx --help` is instant."""

from __future__ import annotations

import sys

import click

from ..core.errors import FtxError
from .grammar import quiet_env


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ftx")
def cli():
    """ftx: fine-tune -> merge -> quantize -> serve -> bench, from one recipe.

    Every verb reads `ftx <verb> [CONFIG.yaml] [key.path=value ...] [--flag value ...]`: flags are aliases of
    config keys (see each verb's --help), key=value sets any key, later ones win."""
    quiet_env()


def _register() -> None:
    from . import bench, data, doctor, eval, export, merge, plan, recipe, serve

    for module in (recipe, eval, data, merge, export, serve, bench, plan, doctor):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


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
