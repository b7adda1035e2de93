"""Export stage: merged HF model -> f16 GGUF (llama.cpp's converter) -> quantized GGUFs (llama.cpp's quantizer),
a top-1 agreement check of every GGUF against the HF model, and an Ollama Modelfile.

Nothing is compiled here: the converter and gguf-py come from the llama-cpp-python sdist and quantization
goes through the installed llama_cpp bindings (see ftx.llamacpp).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import FtxError

# llama.cpp ftype ids (llama.h: enum llama_ftype)
QUANT_FTYPES = {"q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q4_k_m": 15, "q4_0": 2}
MODELFILE_DIR = Path(__file__).resolve().parents[2] / "modelfiles"


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    outtype: str = Field("f16", pattern="^(f16|f32|bf16)$")
    quants: list[str] = Field(default_factory=lambda: ["q8_0", "q4_k_m"])
    min_top1_agreement: float = Field(0.99, ge=0, le=1, description="f16 GGUF vs HF, on validation tokens")
    check_tokens: int = Field(512, ge=16)
    modelfile_quant: str = "q4_k_m"

    @field_validator("quants")
    @classmethod
    def _known_quants(cls, quants: list[str]) -> list[str]:
        bad = [q for q in quants if q not in QUANT_FTYPES]
        if bad:
            raise ValueError(f"unknown quant {bad[0]!r}; choose from {', '.join(QUANT_FTYPES)}")
        return quants


class GgufFile(BaseModel):
    name: str
    file: str
    size_bytes: int
    top1_agreement: float


class ExportResult(BaseModel):
    files: list[GgufFile]
    modelfile: str | None
    modelfile_note: str | None = None


def convert_hf(model_dir: Path, dst: Path, outtype: str, name: str) -> None:
    from . import llamacpp

    cmd = [sys.executable, str(llamacpp.converter("hf")), str(model_dir), "--outfile", str(dst),
           "--outtype", outtype, "--model-name", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0 or not dst.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FtxError(f"convert_hf_to_gguf failed for {model_dir}: {tail[0]}")


def quantize(src: Path, dst: Path, quant: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = os.cpu_count() or 1
    from .util import redirect_fds

    with redirect_fds(dst.parent / "quantize.log"):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.exists():
        raise FtxError(f"llama_model_quantize {quant} failed for {src} (rc={rc})")


def gguf_logits(path: Path, seqs: list[list[int]]):
    """llama.cpp logits at every position of every sequence, concatenated: [total_tokens, vocab]."""
    import numpy as np
    from llama_cpp import Llama

    n_ctx = max(map(len, seqs)) + 8
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False)
    out = []
    for ids in seqs:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    del llm
    return np.concatenate(out)


def chat_family(chat_template: str | None) -> str | None:
    if chat_template and "<|im_start|>" in chat_template and "<|im_end|>" in chat_template:
        return "chatml"
    return None


def default_system(chat_template: str) -> str | None:
    """A system prompt the template injects when the conversation has none (SmolLM2 does this)."""
    m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", chat_template, re.DOTALL)
    return m.group(1) if m and "{{" not in m.group(1) else None


def write_modelfile(tok, gguf_name: str, name: str, num_ctx: int, dst: Path) -> tuple[str | None, str | None]:
    """Render the Modelfile of the template's family; returns (file name, note). No family -> no guess."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    family = chat_family(tok.chat_template)
    if family is None:
        return None, "chat template family not recognized: no Modelfile written (ftx writes only templates it knows)"
    stops = []
    for t in (tok.eos_token, "<|im_end|>", "<|im_start|>"):
        if t and t not in stops:
            stops.append(t)
    env = Environment(loader=FileSystemLoader(MODELFILE_DIR), undefined=StrictUndefined, keep_trailing_newline=True)
    text = env.get_template(f"{family}.Modelfile.j2").render(
        name=name, gguf=f"./{gguf_name}", system=default_system(tok.chat_template), stops=stops, num_ctx=num_ctx
    )
    dst.write_text(text)
    return dst.name, None


def run(cfg: ExportConfig, merged_dir: Path, val_file: Path, name: str, num_ctx: int, out: Path) -> ExportResult:
    from rich.progress import Progress

    from .eval import check_sequences, compare_logits, token_logits
    from .train import load_base

    model, tok = load_base(merged_dir, "lora", "cpu")
    seqs = check_sequences(tok, val_file, cfg.check_tokens)
    ref = token_logits(model, seqs).numpy()
    del model
    files = []
    steps = [(cfg.outtype, None)] + [(q, cfg.outtype) for q in cfg.quants]
    with Progress() as progress:
        task = progress.add_task("export", total=len(steps) * 2)
        for kind, src in steps:
            dst = out / f"model-{kind}.gguf"
            progress.update(task, description=f"{'convert' if src is None else 'quantize'} {kind}")
            if src is None:
                convert_hf(merged_dir, dst, kind, name)
            else:
                quantize(out / f"model-{src}.gguf", dst, kind)
            progress.advance(task)
            progress.update(task, description=f"agreement {kind}")
            cmp = compare_logits(gguf_logits(dst, seqs), ref)
            files.append(GgufFile(name=kind, file=dst.name, size_bytes=dst.stat().st_size,
                                  top1_agreement=cmp["top1_agreement"]))
            progress.advance(task)
    if files[0].top1_agreement < cfg.min_top1_agreement:
        raise FtxError(f"{files[0].file} agrees with the HF model on only {files[0].top1_agreement:.1%} of "
                       f"validation tokens (< export.min_top1_agreement {cfg.min_top1_agreement:.0%})")
    mf_quant = cfg.modelfile_quant if cfg.modelfile_quant in cfg.quants else files[-1].name
    modelfile, note = write_modelfile(tok, f"model-{mf_quant}.gguf", name, num_ctx, out / "Modelfile")
    return ExportResult(files=files, modelfile=modelfile, modelfile_note=note)
