"""The one grammar of every verb: `ftx <verb> [CONFIG.yaml] [key.path=value ...] [--flag value ...]`.

A verb is a pydantic model (its defaults are the only defaults); a flag is a declared alias of one of its keys
(ftx.cli.flags), so flags, `key=value` overrides and the YAML file all set the same things."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .flags import Alias, abs_path, named, numbers, options, overrides  # noqa: F401  (the verbs' vocabulary)


def config_and_overrides(args: tuple[str, ...]) -> tuple[Path | None, list[str]]:
    """The verb's positional words: an optional CONFIG.yaml first, then key.path=value overrides."""
    config, rest = None, list(args)
    if rest and "=" not in rest[0]:
        config = Path(rest.pop(0))
    bad = next((a for a in rest if "=" not in a), None)
    if bad is not None:
        raise click.UsageError(f"{bad!r}: expected key.path=value (only the first word may be a config file)")
    return config, rest


def load(model, args: tuple[str, ...], aliases: list[Alias], params: dict, what: str, resolve: bool = True):
    """The verb's config: the YAML file (if any), then the key=value overrides, then the flags."""
    from ..core import config

    path, texts = config_and_overrides(args)
    return config.load(path, model, [*texts, *overrides(aliases, params)], what=what, resolve=resolve)


def console():
    from rich.console import Console

    return Console(stderr=True)


def quiet_env() -> None:
    import logging

    # bitsandbytes (imported by peft whenever it is installed) warns on CPUs with AVX512-BF16 that an optional
    # kernel package is missing, on every run, plain LoRA included: the fallback it uses is fine (docs/training.md)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    for k, v in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }.items():
        os.environ.setdefault(k, v)


class DefaultGroup(click.Group):
    """A verb with subcommands whose plain form runs a default one: `ftx serve CONFIG` is `ftx serve run CONFIG`,
    `ftx serve k8s CONFIG` the subcommand."""

    def __init__(self, *args, default: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.default = default

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = [self.default, *args]
        return super().parse_args(ctx, args)
