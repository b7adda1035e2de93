"""A self-contained folder to copy to an edge device (recipe `bundle:`, `ftx export --bundle DIR`): the GGUF(s) the
Modelfiles name, the Modelfiles with their template proofs, the run card (or export.json), the model card, the
license and SHA256SUMS (`sha256sum -c SHA256SUMS`). The run directory links into the cache; a bundle holds real
files (hard links when the cache is on the same file system, else copies), so copying it never leaves a dangling
link. Written to a temp dir and renamed into place."""

from __future__ import annotations

from pathlib import Path

from .core.cache import atomic_dir, link_or_copy, sha256_file


def export_files(export_dir: Path, result: dict) -> dict[str, Path]:
    """What of an export goes into a bundle: each Modelfile with its proof and the GGUFs it names (the selected one
    when there is no Modelfile); name in the bundle -> file."""
    export_dir = Path(export_dir)
    files: dict[str, Path] = {}
    packaging = result.get("packaging") or {}
    mf = packaging.get("modelfile")
    if mf and mf.get("file"):
        files[mf["gguf"]] = export_dir / mf["gguf"]
    else:
        selected = next(f for f in result["files"] if f["name"] == result["selected"])
        files[selected["file"]] = export_dir / selected["file"]
    names = ["Modelfile", "Modelfile.proof.json"] if mf and mf.get("file") else []
    lora = packaging.get("lora_adapter")
    if lora and lora.get("modelfile"):
        files[lora["base_file"]] = export_dir / lora["base_file"]
        files[lora["adapter_file"]] = export_dir / lora["adapter_file"]
        names += ["Modelfile.adapter", "Modelfile.adapter.proof.json"]
    files.update({n: export_dir / n for n in names})
    return files


def license_text(base_model: str | None, spdx: str | None, model_dir: Path | None) -> str | None:
    """The license to ship: the base model's own license file when ftx can find it, else a note naming the SPDX id."""
    from .core import basemodel

    found = basemodel.license_file(base_model) if base_model else None
    if found is None and model_dir is not None:
        found = next((p for p in sorted(Path(model_dir).glob("LICENSE*")) if p.is_file()), None)
    if found is not None:
        return found.read_text(errors="replace")
    if spdx:
        return (
            f"The model weights are licensed under {spdx} (SPDX), the license of the base model {base_model}.\n"
            "ftx found no license text to copy; see the base model's distribution for the full terms.\n"
        )
    return None


def write(dest: Path, files: dict[str, Path], texts: dict[str, str]) -> dict:
    """Write the bundle (files placed, texts written) with SHA256SUMS; returns what it holds."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        for name, src in files.items():
            link_or_copy(Path(src).resolve(), tmp / name)
        for name, text in texts.items():
            (tmp / name).write_text(text)
        names = sorted(p.name for p in tmp.iterdir())
        sums = {n: sha256_file(tmp / n) for n in names}
        (tmp / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sums.items()))
        size = sum((tmp / n).stat().st_size for n in names)
    return {"dir": str(dest), "files": names, "size_bytes": size}


def from_export(job, result) -> dict:
    """`ftx export --bundle DIR`: the export's files with export.json, the model card and the license."""
    texts = {"export.json": result.model_dump_json(indent=2)}
    if (Path(job.model) / "README.md").is_file():
        texts["README.md"] = (Path(job.model) / "README.md").read_text()
    found = license_text(job.base, None, job.model)
    if found:
        texts["LICENSE"] = found
    return write(job.bundle, export_files(job.out, result.model_dump()), texts)
