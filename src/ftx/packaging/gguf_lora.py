"""The adapter as a GGUF LoRA (llama.cpp's convert_lora_to_gguf.py) over the base model as an f16 GGUF, for
llama.cpp (`--lora`, one base + many adapters) and Ollama (ADAPTER); llama.cpp's base+adapter logits must match
the HF model's (the merged model, itself proven equal to base+adapter in peft by the merge stage)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from ..core.errors import FtxError
from .base import Job, Step


class LoraGguf(BaseModel):
    base_file: str
    adapter_file: str
    adapter_size_bytes: int
    top1_agreement: float = Field(description="llama.cpp base+adapter vs the HF model, validation tokens")
    max_abs_logit_diff: float
    modelfile: str | None = None
    modelfile_note: str | None = None


def base_f16(base_dir: Path) -> Path:
    """The base model as an f16 GGUF, converted once per base model (content hash) and converter version into the
    machine cache: every export of an adapter of the same base shares it."""
    from ..core import gguf
    from ..core.cache import atomic_dir, cache_root, sha256_tree, stable_hash
    from ..core.llamacpp import LLAMA_CPP_PYTHON_VERSION

    key = stable_hash({"base": sha256_tree(base_dir), "converter": LLAMA_CPP_PYTHON_VERSION})[:16]
    dest = cache_root() / "gguf" / key
    if not (dest / "base-f16.gguf").is_file():
        with atomic_dir(dest) as tmp:
            gguf.convert_hf(base_dir, tmp / "base-f16.gguf", "f16", Path(base_dir).name)
    return dest / "base-f16.gguf"


class GgufLoraStep(Step):
    name = "lora_adapter"
    settings = bool
    default = False
    description = (
        "also export the adapter as a GGUF LoRA (+ the base model as an f16 GGUF), verified in llama.cpp, "
        "with Modelfile.adapter"
    )
    formats = ("gguf",)

    def run(self, value: bool, job: Job) -> LoraGguf:
        from ..core import gguf
        from ..core.adapters import TARGETS, support
        from ..core.cache import link_or_copy
        from ..core.models import compare_logits
        from .modelfile import runtime, write

        if job.base_dir is None or job.adapter_dir is None:
            raise FtxError("export.lora_adapter needs the base model and the adapter (run it from a recipe)")
        target = support(job.adapter_dir, TARGETS[1])  # the GGUF LoRA: refuse up front, with the reason
        if not target["supported"]:
            raise FtxError(f"export.lora_adapter: {target['reason']} (or set export.lora_adapter: false)")
        base_gguf, adapter_gguf = job.out / "base-f16.gguf", job.out / "adapter-f16.gguf"
        link_or_copy(base_f16(job.base_dir), base_gguf)
        gguf.convert_lora(job.adapter_dir, job.base_dir, adapter_gguf)
        cmp = compare_logits(gguf.logits(base_gguf, job.seqs, lora=adapter_gguf), job.ref_logits)
        if cmp["top1_agreement"] < job.cfg.min_top1_agreement:
            raise FtxError(
                f"llama.cpp base + {adapter_gguf.name} agrees with the HF model on only "
                f"{cmp['top1_agreement']:.1%} of validation tokens (< export.min_top1_agreement)"
            )
        mf = getattr(job.cfg, "modelfile", None)  # the Modelfile settings apply to Modelfile.adapter too
        rt = runtime(job.base_dir, mf.num_ctx if mf else None, mf.parameters if mf else {}, job.num_ctx)
        proof = write(
            job.tok,
            job.base_dir,
            base_gguf,
            job.name,
            rt["num_ctx"],
            job.out / "Modelfile.adapter",
            adapter=adapter_gguf,
            parameters=rt["parameters"],
            extra_stops=job.extra_stops,
        )
        return LoraGguf(
            base_file=base_gguf.name,
            adapter_file=adapter_gguf.name,
            adapter_size_bytes=adapter_gguf.stat().st_size,
            top1_agreement=cmp["top1_agreement"],
            max_abs_logit_diff=cmp["max_abs_diff"],
            modelfile="Modelfile.adapter" if proof.proven else None,
            modelfile_note=proof.reason,
        )

    def card(self, r: dict, recipe: str) -> str:
        ollama = f" (Ollama: `ollama create {recipe}-lora -f {r['modelfile']}`)" if r["modelfile"] else ""
        return (
            f"GGUF LoRA: `{r['adapter_file']}` ({r['adapter_size_bytes'] / 1e6:.1f} MB) over `{r['base_file']}`; "
            f"llama.cpp base+adapter vs the HF model: top-1 agreement {100 * r['top1_agreement']:.1f}%, max |logit "
            f"diff| {r['max_abs_logit_diff']:.2e}{ollama}."
        )
