"""Run directory: manifest.json (lineage), run_card.json/.md, links to the cached stage outputs."""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path

from .util import atomic_dir, write_json

TEMPLATES = Path(__file__).parent / "templates"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:120]


def _ms(v) -> str:
    return "—" if v is None else f"{1000 * v:.0f}"


def render_markdown(card: dict) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, trim_blocks=False)
    env.filters.update(cell=_cell, ms=_ms)
    return env.get_template("run_card.md.j2").render(c=card)


def build_card(recipe, runner, run_id: str, created: str, wall_s: float, versions: dict, git: dict) -> dict:
    res = {name: r.result for name, r in runner.runs.items()}
    card = {
        "recipe": recipe.name, "run_id": run_id, "created": created, "base_model": recipe.base_model,
        "versions": versions, "git": git, "wall_s": wall_s,
        "stages": [{"name": r.name, "key": r.key, "cached": r.cached, "wall_s": r.wall_s, "peak_rss_mb": r.peak_rss_mb}
                   for r in runner.runs.values()],
    }
    for name in ("data", "train", "dpo", "eval", "merge", "export", "serve", "bench"):
        card[name] = res.get(name)
    if card["eval"]:
        card["eval"] = {**card["eval"], "samples": card["eval"]["samples"][:6]}
    if card["serve"]:
        card["serve"] = {**card["serve"], "samples": card["serve"]["samples"][:4]}
    if card["bench"]:
        from .bench.report import markdown

        card["bench_md"] = markdown(card["bench"])
    return card


def _link(src: Path, dst: Path) -> None:
    os.symlink(os.path.relpath(src, dst.parent), dst)


def write_run_dir(recipe, runner, inputs, config, overrides, started, wall_s, versions, git, console) -> Path:
    from rich.table import Table

    run_id = started.strftime("%Y%m%d-%H%M%S") + f"-{started.microsecond // 1000:03d}"
    final = recipe.output_dir.resolve() / recipe.name / run_id
    created = started.isoformat(timespec="seconds")
    card = build_card(recipe, runner, run_id, created, wall_s, versions, git)
    with atomic_dir(final) as tmp:
        (tmp / "stages").mkdir()
        for name, r in runner.runs.items():
            _link(Path(r.dir), tmp / "stages" / name)
        # artifacts a user reaches for, at the top of the run dir (links into the cache; plots copied)
        for stage, rel, name in (("train", "loss.png", "loss.png"), ("dpo", "dpo.png", "dpo.png"),
                                 ("bench", "latency_cdf.png", "latency_cdf.png"), ("bench", "sweep.png", "sweep.png")):
            if stage in runner.runs and (Path(runner.runs[stage].dir) / rel).exists():
                shutil.copy(Path(runner.runs[stage].dir) / rel, tmp / name)
        final_adapter = next((s for s in ("dpo", "train") if s in runner.runs), None)
        if final_adapter:
            _link(runner.path(final_adapter, "adapter"), tmp / "adapter")
        if "merge" in runner.runs:
            _link(runner.path("merge", "merged"), tmp / "merged")
        if "export" in runner.runs:
            for f in runner.runs["export"].result["files"]:
                _link(runner.path("export", f["file"]), tmp / f["file"])
            lora = runner.runs["export"].result.get("lora")
            for mf in ("Modelfile", "Modelfile.adapter"):  # with their template proofs (also when unproven)
                for f in (mf, f"{mf}.proof.json"):
                    if runner.path("export", f).exists():
                        shutil.copy(runner.path("export", f), tmp / f)
            if lora:
                for f in (lora["base_file"], lora["adapter_file"]):
                    _link(runner.path("export", f), tmp / f)
        manifest = {
            "ftx_version": versions["ftx"], "run_id": run_id, "recipe": recipe.name, "started": created,
            "finished": datetime.now(started.tzinfo).isoformat(timespec="seconds"), "wall_s": wall_s,
            "config": config, "overrides": overrides, "inputs": inputs, "versions": versions, "git": git,
            "llama_cpp": {"source": "llama-cpp-python sdist (vendored llama.cpp)", "version": versions.get("llama_cpp_python")},
            "stages": {name: {"key": r.key, "cached": r.cached, "dir": r.dir, "wall_s": r.wall_s,
                              "peak_rss_mb": r.peak_rss_mb} for name, r in runner.runs.items()},
        }
        write_json(tmp / "manifest.json", manifest)
        write_json(tmp / "run_card.json", card)
        (tmp / "run_card.md").write_text(render_markdown(card))
    latest = final.parent / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    os.symlink(final.name, latest)

    table = Table(title=f"{recipe.name} · {run_id}")
    for col in ("stage", "status", "wall s", "peak RSS MB", "headline"):
        table.add_column(col)
    for r in runner.runs.values():
        table.add_row(r.name, "cached" if r.cached else "ran", f"{r.wall_s:.1f}", f"{r.peak_rss_mb:.0f}", headline(r.name, r.result))
    console.print(table)
    console.print(f"run card: {final / 'run_card.md'}")
    return final


def headline(name: str, r: dict) -> str:
    if name == "data":
        return f"{r['train_rows']} train / {r['val_rows']} val / {r['heldout_rows']} held-out rows"
    if name == "train":
        return f"val loss {r['val_loss']:.3f}, {r['steps']} steps"
    if name == "dpo":
        return (f"preference acc {100 * r['sft_preference_accuracy']:.0f}% -> {100 * r['dpo_preference_accuracy']:.0f}%, "
                f"margin {r['sft_logp_margin']:.2f} -> {r['dpo_logp_margin']:.2f}")
    if name == "eval":
        fr = r.get("ft_format_rate")
        fmt = f"format {100 * r['base_format_rate']:.0f}% -> {100 * fr:.0f}%, " if fr is not None else ""
        return f"{fmt}val ppl {r['base_val_perplexity']:.2f} -> {r['ft_val_perplexity']:.2f}"
    if name == "merge":
        return f"max |logit diff| {r['max_abs_logit_diff']:.1e}"
    if name == "export":
        return ", ".join(f"{f['name']} {f['size_bytes'] / 1e6:.0f}MB" + ("*" if f["name"] == r.get("selected") else "")
                         for f in r["files"]) + " (* gate pick)"
    if name == "serve":
        return ("vLLM, " if r.get("engine") == "vllm" else "") + f"ready in {r['startup_s']:.1f}s" + (f", format {100 * r['format_rate']:.0f}%" if r["format_rate"] is not None else "")
    if name == "bench":
        best = r.get("best")
        slo = f"highest load meeting the SLO: {best['level']:g}" if best else "no load level meets the SLO"
        cost = f", ${r['cost']['usd_per_1m_tokens']:.3f}/1M tokens" if r.get("cost") else ""
        e2e = r["e2e_s"]["p99"]
        return f"P99 e2e {1000 * e2e:.0f} ms, {r['output_tokens_per_s']:.1f} tok/s; {slo}{cost}" if e2e else slo
    return ""
