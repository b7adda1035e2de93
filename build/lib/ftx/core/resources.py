"""Files that ship inside the ftx package (src/ftx/resources/), read through importlib.resources so that a wheel
install works as well as a checkout: API prices, hardware profiles, Modelfile templates (Go TEMPLATE per
chat-template family), the run-card templates and the Go renderer's source.

The repository's top-level `modelfiles/`, `bench/api_prices.yaml` and `bench/hardware/` are links into this
folder, so there is one copy of each file."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import FtxError

PACKAGE = "ftx.resources"


def files():
    return resources.files(PACKAGE)


def path(*parts: str) -> Path:
    """A packaged file as a filesystem path (ftx is installed unzipped, so no temporary copy is needed)."""
    p = files().joinpath(*parts)
    if not p.is_file():
        raise FtxError(f"packaged resource {'/'.join(parts)} is missing from the ftx installation")
    return Path(str(p))


def text(*parts: str) -> str:
    return path(*parts).read_text(encoding="utf-8")


def folder(*parts: str) -> Path:
    return Path(str(files().joinpath(*parts)))


def hardware_profiles() -> dict[str, Path]:
    """Packaged hardware profiles by name (file stem): usable as `bench.hardware: <name>`."""
    return {p.stem: p for p in sorted(folder("hardware").glob("*.yaml"))}
