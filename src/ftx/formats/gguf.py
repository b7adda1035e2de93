"""GGUF for llama.cpp and Ollama: the merged HF model -> a full-precision GGUF (llama.cpp's converter, with ftx's
metadata) -> a ladder of quantized GGUFs (llama-quantize, optionally with an importance matrix computed by
llama-imatrix on the training conversations, never on the gate's evaluation text). Scored through the llama.cpp
bindings on exact token ids (not llama-perplexity: it tokenizes its input without special tokens, so chat
markers would be scored as text, and in KL mode it takes PPL(base) from uint16-compressed log-probs, which on
this text reported Q8_0 at PPL ratio 1.197 where the two PPLs differ by 0.7%)."""

from __future__ import annotations

import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core import gguf
from ..core.errors import FtxError
from .base import Format

# ftx quant name -> llama-quantize type name, largest first
QUANT_FTYPES = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q4_k_m": "Q4_K_M", "q4_0": "Q4_0"}
# bits per weight of each quant (llama.cpp's quantize table), for the disk-space check
QUANT_BITS = {"q8_0": 8.5, "q6_k": 6.56, "q5_k_m": 5.7, "q4_k_m": 4.89, "q4_0": 4.55}
OUTTYPE_BITS = {"f32": 32, "f16": 16, "bf16": 16}


class GgufSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    outtype: Literal["f16", "bf16", "f32"] = Field("f16", description="the reference GGUF's precision")
    quants: list[Literal[tuple(QUANT_FTYPES)]] = Field(
        default_factory=lambda: ["q8_0", "q6_k", "q5_k_m", "q4_k_m"],
        description="the quant ladder (llama-quantize types)",
    )
    imatrix: bool = Field(
        False,
        description="quantize with an importance matrix (llama-imatrix) computed on the "
        "training conversations (never on the gate's evaluation text)",
    )
    imatrix_chunks: int | None = Field(
        None, ge=1, description="imatrix: at most this many 128-token chunks of the training conversations (all: null)"
    )


def metadata(name: str, lineage: str | None, base_model: str | None) -> dict:
    """general.* keys for the converter's --metadata: the run's name and the ftx lineage hash (the export
    stage's content key: config + every upstream stage + input hashes). The license comes from the merged
    model's card (README.md, written by the merge stage), which the converter reads itself."""
    meta = {"general.name": name, "general.finetune": name, "general.quantized_by": "ftx"}
    if base_model:
        meta["general.base_models"] = [{"name": base_model}]
    if lineage:
        meta["general.description"] = f"Fine-tuned and exported by ftx; lineage {lineage} (see the run's manifest.json)"
        meta["general.tags"] = ["ftx", f"ftx-lineage:{lineage}"]
    return meta


def check_disk(settings: GgufSettings, model_dir: Path, out: Path) -> None:
    """Enough free space for the reference GGUF and every quant (+10%), before anything is written."""
    fp32_bytes = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    params = fp32_bytes / 4  # merged models are saved in fp32 (bf16 on CUDA: then this over-estimates)
    need = params * (OUTTYPE_BITS[settings.outtype] + sum(QUANT_BITS[q] for q in settings.quants)) / 8 * 1.1
    free = shutil.disk_usage(out).free
    if free < need:
        raise FtxError(
            f"not enough disk space for the export: needs ~{need / 1e9:.1f} GB "
            f"({settings.outtype} + {', '.join(settings.quants)}), {free / 1e9:.1f} GB free",
            where=str(out),
        )


# the types a searched tensor group may take, smallest first: llama.cpp's K-quants need rows that are a multiple
# of 256 wide (576-wide SmolLM2 rows are not), the older types a multiple of 32
SEARCH_TYPES = {256: ["q3_K", "q4_K", "q5_K", "q6_K", "q8_0"], 32: ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]}


def search_units(reference: Path, blocks: int):
    """The GGUF cut into search units: each 2-D tensor kind of the layers (attn_q, ffn_down, ...) over `blocks`
    blocks of consecutive layers, and token_embd / output on their own; with each unit's regex for llama-quantize
    and its size at every type it may take. Returns (units, patterns, fixed bytes, weights, overhead): fixed bytes
    are the metadata (overhead) and the tensors the search leaves alone (norms, kept at the reference's type)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from .search import Unit

    header = gguf.read_header(reference)
    layers = 1 + max((int(m.group(1)) for t in header.tensors if (m := re.match(r"blk\.(\d+)\.", t[0]))), default=0)
    members: dict[str, list] = {}
    overhead = header.size - sum(t[3] for t in header.tensors)
    fixed, weights = overhead, 0
    for name, dims, _, nbytes in header.tensors:
        n = math.prod(dims)
        weights += n
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if len(dims) < 2 or not (m or name in ("token_embd.weight", "output.weight")):
            fixed += nbytes
            continue
        if m:
            b = int(m.group(1)) * blocks // layers
            lo, hi = -(-b * layers // blocks), -(-(b + 1) * layers // blocks) - 1
            unit = f"{m.group(2)}[{lo}-{hi}]" if blocks > 1 else m.group(2)
        else:
            unit = name.removesuffix(".weight")
        members.setdefault(unit, []).append((name, dims[0], n))
    units, patterns = [], {}
    for unit, tensors in members.items():
        width = 256 if all(cols % 256 == 0 for _, cols, _ in tensors) else 32
        options = []
        for t in SEARCH_TYPES[width]:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]]
            options.append((t, sum(n // block * size for _, _, n in tensors), 8 * size / block))
        units.append(Unit(unit, options))
        patterns[unit] = "^(" + "|".join(re.escape(name) for name, _, _ in tensors) + ")$"
    return units, patterns, fixed, weights, overhead


# llama.cpp's standard mixtures, largest first: the search keeps the largest that fits when it measures better
PRESETS = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0"]


def preset_bytes(reference: Path, ftype: str) -> int:
    """Tensor-data bytes of a standard mixture (llama-quantize --dry-run, which writes nothing)."""
    text = gguf.run_tool("llama-quantize", ["--dry-run", reference, ftype], Path(os.devnull))
    mib = re.search(r"quant size\s*=\s*([\d.]+) MiB", text)
    if not mib:
        raise FtxError(f"llama-quantize --dry-run {ftype}: no size in its output")
    return int(float(mib.group(1)) * 2**20)


def unit_types(path: Path, units, patterns: dict[str, str]) -> dict[str, str]:
    """A built GGUF's type per search unit: the most common among the unit's tensors, as one of the unit's options
    (the nearest in bits per weight when the file's type is not among them)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    tensors = gguf.read_header(path).tensors
    out = {}
    for u in units:
        rx = re.compile(patterns[u.name])
        found = Counter(t for name, _, t, _ in tensors if rx.match(name)).most_common(1)[0][0]
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[found.upper()]]
        out[u.name] = min(u.options, key=lambda o: abs(o[2] - 8 * size / block))[0]
    return out


def quantize_mix(src: Path, dst: Path, patterns: dict[str, str], types: dict[str, str], imatrix: Path | None) -> None:
    """llama-quantize with one type per unit (a --tensor-type-file of anchored regexes, written next to `dst`)."""
    overrides = dst.parent / f"{dst.stem}.units.txt"
    overrides.write_text("".join(f"{patterns[u]}={t}\n" for u, t in types.items()))
    quantize(src, dst, "Q8_0", imatrix, ["--tensor-type-file", overrides])  # Q8_0: only for tensors none names


def quantize(src: Path, dst: Path, quant: str, imatrix: Path | None = None, options: list = ()) -> None:
    """llama-quantize to one of its mixtures: an ftx quant name (q4_k_m) or llama-quantize's own (Q4_K_S), with
    more `options` (per-tensor overrides)."""
    extra = [*(["--imatrix", imatrix] if imatrix else []), *options]
    ftype = QUANT_FTYPES.get(quant, quant)
    gguf.run_tool("llama-quantize", [*extra, src, dst, ftype, os.cpu_count() or 1], dst.parent / "tools.log")
    if not dst.exists():
        raise FtxError(f"llama-quantize {quant} wrote nothing for {src}")


class Gguf(Format):
    name = "gguf"
    settings = GgufSettings

    def check(self, settings: GgufSettings, model_dir: Path, out: Path) -> None:
        gguf.check_architecture(model_dir)
        check_disk(settings, model_dir, out)

    def artifact_names(self, settings: GgufSettings) -> list[str]:
        return [settings.outtype, *settings.quants]

    def reference(
        self, settings: GgufSettings, model_dir: Path, out: Path, name: str, lineage: str | None, base_model: str | None
    ) -> tuple[str, Path]:
        dst = out / f"model-{settings.outtype}.gguf"
        gguf.convert_hf(model_dir, dst, settings.outtype, name, metadata(name, lineage, base_model))
        return settings.outtype, dst

    def _imatrix(self, settings: GgufSettings, reference: Path, out: Path, calibration: list[str] | None) -> Path:
        """llama-imatrix on the training conversations (once per export: out/imatrix.gguf)."""
        imatrix = out / "imatrix.gguf"
        if imatrix.exists():
            return imatrix
        if not calibration:
            raise FtxError("an importance matrix needs calibration text: the training split (run it from a recipe)")
        calib = out / ".reference" / "calibration.txt"
        calib.parent.mkdir(exist_ok=True)
        calib.write_text("\n".join(calibration))
        chunks = ["--chunks", settings.imatrix_chunks] if settings.imatrix_chunks else []
        args = ["-m", reference, "-f", calib, "-o", imatrix, "-c", 128, *chunks, "-t", os.cpu_count() or 1]
        gguf.run_tool("llama-imatrix", args, out / "tools.log")
        return imatrix

    def variants(self, settings: GgufSettings, reference: Path, out: Path, calibration: list[str] | None):
        imatrix = self._imatrix(settings, reference, out, calibration) if settings.imatrix else None
        for q in settings.quants:
            dst = out / f"model-{q}.gguf"
            quantize(reference, dst, q, imatrix)
            yield q, dst

    def logits(self, path: Path, seqs: list[list[int]]):
        return gguf.logits(path, seqs)

    def logprobs(self, path: Path, seqs: list[list[int]]):
        return gguf.logprobs(path, seqs)

    def generate(self, path: Path, prompts: list[list[int]], max_tokens: int):
        return gguf.generate(path, prompts, max_tokens)

    def metadata(self, path: Path) -> dict:
        keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.chat_template")
        f = gguf.fields(path, keys)
        return {
            "end_ids": sorted({f[k] for k in keys[:2] if k in f}),
            "chat_template": f.get("tokenizer.chat_template"),
        }

    def search(self, settings: GgufSettings, target, reference: Path, out: Path, calibration, score, progress):
        """Per-tensor-group quant types for the lowest KLD within `target` (ftx.formats.search), with the
        importance matrix of the training conversations, against llama.cpp's own largest mixture that fits;
        writes model-target.gguf and model-target.tensor-types.txt (every tensor's type, a --tensor-type-file
        that rebuilds it)."""
        from . import search

        imatrix = self._imatrix(settings, reference, out, calibration)
        units, patterns, fixed, weights, overhead = search_units(reference, target.blocks)
        budget = target.budget(weights, overhead)
        scratch = out / ".search"
        scratch.mkdir(exist_ok=True)
        candidate = scratch / "candidate.gguf"

        def measure(types: dict[str, str]) -> tuple[float, int]:
            quantize_mix(reference, candidate, patterns, types, imatrix)
            return score(candidate), candidate.stat().st_size

        def preset(ftype: str):
            def build() -> tuple[float, int, dict[str, str]]:
                quantize(reference, candidate, ftype, imatrix)
                return score(candidate), candidate.stat().st_size, unit_types(candidate, units, patterns)

            return build

        # the largest that fits (--dry-run prints MiB to 2 decimals: within 0.005 MiB it is built and measured)
        fitting = [f for f in PRESETS if preset_bytes(reference, f) + overhead <= budget + 0.005 * 2**20][:1]
        presets = {f: preset(f) for f in fitting}
        result = search.search(units, fixed, budget, measure, progress, presets, target.refine_evals)
        dst = out / "model-target.gguf"
        if result.kept in PRESETS:  # llama.cpp's own mixture measured best
            quantize(reference, dst, result.kept, imatrix)
        else:
            quantize_mix(reference, dst, patterns, result.types, imatrix)
        shutil.rmtree(scratch)
        tensors = gguf.read_header(dst).tensors
        overrides = out / "model-target.tensor-types.txt"
        overrides.write_text("".join(f"^{re.escape(n)}$={t}\n" for n, dims, t, _ in tensors if len(dims) > 1))
        return (
            "target",
            dst,
            {
                **result.model_dump(),
                "size_bytes": dst.stat().st_size,
                "overrides_file": overrides.name,
                "imatrix": imatrix.name,
                "tensor_types": dict(Counter(t[2] for t in tensors).most_common()),
                "units": {u.name: [t for t, _, _ in u.options] for u in units},
            },
        )

    def extras(self, settings: GgufSettings, out: Path) -> dict:
        # the ladder's importance matrix (export.target's search computes and reports its own when the ladder has none)
        return {"imatrix": "imatrix.gguf" if settings.imatrix and (out / "imatrix.gguf").exists() else None}
