"""The run directory: manifest.json (lineage), run_card.json/.md, and each stage's artifacts at the top level.

The card is assembled from the stage registry: a header and the stage table, then one section per stage that
ran, rendered from the packaged template card/<stage>.md.j2 with the stage's `card_data`; the artifacts come
from each stage's `artifacts` (symlinks into the cache, small files copied)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from datetime import datetime
from importlib import metadata
from pathlib import Path

from . import __version__
from .core import resources
from .core.cache import atomic_dir, write_json

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "llama_cpp_python",
    "gguf",
    "openai",
    "numpy",
    "pydantic",
)


def package_versions() -> dict[str, str | None]:
    out = {"ftx": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> dict:
    """The commit of the ftx checkout this runs from (None for an installed wheel), and whether it has changes."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return {"commit": None, "dirty": None}
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return {"commit": head.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def redacted(recipe) -> dict:
    """The resolved recipe for the manifest, with secrets replaced."""
    import json

    cfg = json.loads(recipe.model_dump_json())
    if (cfg.get("serve") or {}).get("api_key"):
        cfg["serve"]["api_key"] = "***"
    return cfg


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:120]


def _env():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(resources.folder("templates")), undefined=StrictUndefined)
    env.filters.update(cell=_cell)
    return env


def render_markdown(card: dict, stages: list) -> str:
    env = _env()
    sections = []
    for s in stages:
        if card.get(s.name) is not None and (resources.folder("templates") / "card" / f"{s.name}.md.j2").is_file():
            sections.append(env.get_template(f"card/{s.name}.md.j2").render(r=card[s.name], c=card).strip() + "\n")
    return env.get_template("run_card.md.j2").render(c=card, sections=sections)


def build_card(recipe, runner, run_id: str, created: str, wall_s: float, versions: dict, git: dict) -> dict:
    card = {
        "recipe": recipe.name,
        "run_id": run_id,
        "created": created,
        "base_model": recipe.base_model,
        "versions": versions,
        "git": git,
        "wall_s": wall_s,
        "stages": [],
        "bundle": None,
    }
    for name, r in runner.runs.items():
        stage = runner.registry[name]
        card["stages"].append(
            {
                "name": name,
                "key": r.key,
                "cached": r.cached,
                "wall_s": r.wall_s,
                "peak_rss_mb": r.peak_rss_mb,
                "headline": stage.headline(r.result),
            }
        )
        card[name] = stage.card_data(r.result, recipe.name)
    return card


def _bundle_texts(recipe, runner) -> dict[str, str]:
    """The model card and the license for a bundle, when there are."""
    from . import bundle
    from .core import basemodel

    merge = runner.runs.get("merge")
    merged = Path(merge.dir) / merge.result["merged_dir"] if merge else None
    texts = {}
    if merged is not None and (merged / "README.md").is_file():
        texts["README.md"] = (merged / "README.md").read_text()
    spdx = recipe.license or basemodel.LICENSES.get(recipe.base_model)
    license_text = bundle.license_text(recipe.base_model, spdx, merged)
    if license_text:
        texts["LICENSE"] = license_text
    return texts


def _place(src: Path, dst: Path, copy: bool) -> None:
    if copy:
        shutil.copy(src, dst)
    else:
        os.symlink(os.path.relpath(src, dst.parent), dst)


def write_run_dir(recipe, runner, overrides: list[str], started: datetime, wall_s: float, console) -> Path:
    from rich.table import Table

    versions, git = package_versions(), git_commit()
    run_id = started.strftime("%Y%m%d-%H%M%S") + f"-{started.microsecond // 1000:03d}"
    final = recipe.output_dir.resolve() / recipe.name / run_id
    created = started.isoformat(timespec="seconds")
    card = build_card(recipe, runner, run_id, created, wall_s, versions, git)
    bundle_files, bundle_texts = None, {}
    if recipe.bundle is not None and "export" in runner.runs:
        from . import bundle

        bundle_files = bundle.export_files(Path(runner.runs["export"].dir), runner.runs["export"].result)
        bundle_texts = _bundle_texts(recipe, runner)
        names = [*bundle_files, *bundle_texts, "run_card.md", "run_card.json", "SHA256SUMS"]
        card["bundle"] = {"dir": str(recipe.bundle), "files": sorted(names)}
    inputs = dict(runner.inputs)
    if "base_model" in inputs:  # the converted HF directory the stages loaded, next to what was hashed
        inputs["base_model"] = {**inputs["base_model"], "name": recipe.base_model, "path": str(runner.base_dir())}
    with atomic_dir(final) as tmp:
        (tmp / "stages").mkdir()
        shown: dict[str, tuple[Path, bool]] = {}
        for name, r in runner.runs.items():
            _place(Path(r.dir), tmp / "stages" / name, copy=False)
            for a in runner.registry[name].artifacts(r.result):
                src = Path(r.dir) / a.src
                if src.exists() or not a.optional:
                    shown[a.name] = (src, a.copy)  # a later stage's artifact of the same name wins (DPO's adapter)
        for name, (src, copy) in shown.items():
            _place(src, tmp / name, copy)
        manifest = {
            "ftx_version": versions["ftx"],
            "run_id": run_id,
            "recipe": recipe.name,
            "started": created,
            "finished": datetime.now(started.tzinfo).isoformat(timespec="seconds"),
            "wall_s": wall_s,
            "config": redacted(recipe),
            "overrides": overrides,
            "inputs": inputs,
            "versions": versions,
            "git": git,
            "llama_cpp": {
                "source": "llama-cpp-python sdist (vendored llama.cpp)",
                "version": versions.get("llama_cpp_python"),
            },
            "stages": {
                name: {"key": r.key, "cached": r.cached, "dir": r.dir, "wall_s": r.wall_s, "peak_rss_mb": r.peak_rss_mb}
                for name, r in runner.runs.items()
            },
        }
        write_json(tmp / "manifest.json", manifest)
        write_json(tmp / "run_card.json", card)
        markdown = render_markdown(card, runner.stages)
        (tmp / "run_card.md").write_text(markdown)
    if bundle_files is not None:
        import json

        from . import bundle

        texts = {**bundle_texts, "run_card.md": markdown, "run_card.json": json.dumps(card, indent=2, default=str)}
        bundle.write(recipe.bundle, bundle_files, texts)
    latest = final.parent / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    os.symlink(final.name, latest)
    if console:
        table = Table(title=f"{recipe.name} · {run_id}")
        for col in ("stage", "status", "wall s", "peak RSS MB", "headline"):
            table.add_column(col)
        for s in card["stages"]:
            table.add_row(
                s["name"],
                "cached" if s["cached"] else "ran",
                f"{s['wall_s']:.1f}",
                f"{s['peak_rss_mb']:.0f}",
                s["headline"],
            )
        console.print(table)
        console.print(f"run card: {final / 'run_card.md'}")
    return final
