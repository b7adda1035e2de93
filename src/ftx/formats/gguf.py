"""GGUF for llama.cpp and Ollama: the merged HF model -> a full-precision GGUF (llama.cpp's converter, with ftx's
metadata) -> a ladder of quantized GGUFs (llama-quantize, optionally with an importance matrix computed by
llama-imatrix on the training conversations, never on the gate's evaluation text). Scored through the llama.cpp
bindings on exact token ids (not llama-perplexity: it tokenizes its input without special tokens, so chat
markers would be scored as text, and in KL mode it takes PPL(base) from uint16-compressed log-probs, which on
this text reported Q8_0 at PPL ratio 1.197 where the two PPLs differ by 0.7%)."""

from __future__ import annotations

import os
import shutil
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


def quantize(src: Path, dst: Path, quant: str, imatrix: Path | None = None) -> None:
    extra = ["--imatrix", imatrix] if imatrix else []
    gguf.run_tool(
        "llama-quantize", [*extra, src, dst, QUANT_FTYPES[quant], os.cpu_count() or 1], dst.parent / "tools.log"
    )
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

    def variants(self, settings: GgufSettings, reference: Path, out: Path, calibration: list[str] | None):
        imatrix = None
        if settings.imatrix:
            if not calibration:
                raise FtxError("export.gguf.imatrix needs calibration text: the training split (run it from a recipe)")
            calib = out / ".reference" / "calibration.txt"
            calib.parent.mkdir(exist_ok=True)
            calib.write_text("\n".join(calibration))
            imatrix = out / "imatrix.gguf"
            chunks = ["--chunks", settings.imatrix_chunks] if settings.imatrix_chunks else []
            args = ["-m", reference, "-f", calib, "-o", imatrix, "-c", 128, *chunks, "-t", os.cpu_count() or 1]
            gguf.run_tool("llama-imatrix", args, out / "tools.log")
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

    def extras(self, settings: GgufSettings, out: Path) -> dict:
        return {"imatrix": "imatrix.gguf" if (out / "imatrix.gguf").exists() else None}
