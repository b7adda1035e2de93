"""Export stage: merged HF model -> f16 GGUF (llama.cpp's converter) -> a ladder of quantized GGUFs
(llama-quantize, optionally with an importance matrix from llama-imatrix), a quality gate, an Ollama Modelfile.

Quality gate: on the recipe's held-out conversations (+ validation rows), rendered with the model's chat
template, each quant is compared with the f16 reference through llama.cpp itself (the bindings, all logits
kept): PPL ratio, mean and P99 KL divergence and same-top-token rate, defined as `llama-perplexity
--kl-divergence` defines them. Not llama-perplexity itself: it tokenizes its input without special tokens (chat
markers would be scored as text) and in KL mode takes PPL(base) from uint16-compressed log-probs, which on
this text reported Q8_0 at PPL ratio 1.197 where the two PPLs differ by 0.7%. The recipe sets budgets; the
smallest quant within them is selected (served, and named in the Modelfile); the stage fails when none is. Each GGUF's top-1 agreement with the HF
model on validation tokens is checked too (the f16 file must reach export.min_top1_agreement).

Nothing is compiled here: converter, gguf-py and tools come from the llama-cpp-python sdist (ftx.llamacpp).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import modelfile
from .errors import FtxError

# ftx quant name -> llama-quantize type name, largest first
QUANT_FTYPES = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q4_k_m": "Q4_K_M", "q4_0": "Q4_0"}


class QualityGate(BaseModel):
    """Budgets against the f16 GGUF. Defaults from llama.cpp's LLaMA-3-8B scoreboard
    (tools/perplexity/README.md, wikitext-2): Q4_K_M has mean KLD 0.031 and PPL ratio 1.028, Q4_0 0.072 and
    1.075, Q5_K_M 0.011 and 1.011. The defaults (0.05, 1.05) accept Q4_K_M-class quality and reject Q4_0-class."""
    model_config = ConfigDict(extra="forbid")
    max_mean_kld: float | None = Field(0.05, gt=0)
    max_ppl_ratio: float | None = Field(1.05, gt=1)
    max_p99_kld: float | None = Field(None, gt=0)
    min_same_top: float | None = Field(None, gt=0, le=1, description="share of tokens with the same top-1 as f16")


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    outtype: str = Field("f16", pattern="^(f16|f32|bf16)$")
    quants: list[str] = Field(default_factory=lambda: ["q8_0", "q6_k", "q5_k_m", "q4_k_m"])
    quality_gate: QualityGate | None = Field(default_factory=QualityGate, description="null: keep every quant")
    imatrix: bool = Field(False, description="quantize with an importance matrix (llama-imatrix) computed on the "
                                             "training conversations (never on the gate's evaluation text)")
    min_top1_agreement: float = Field(0.99, ge=0, le=1, description="f16 GGUF vs HF, on validation tokens")
    check_tokens: int = Field(512, ge=16)
    modelfile_quant: str = Field("auto", description="auto: the quant the gate selected")
    lora_adapter: bool = Field(False, description="also export the adapter as a GGUF LoRA (+ the base model as "
                                                  "an f16 GGUF) and verify base+adapter in llama.cpp")

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
    top1_agreement: float = Field(description="vs the HF model on validation tokens")
    ppl: float | None = None
    ppl_ratio: float | None = Field(None, description="PPL(quant) / PPL(f16) on the evaluation text")
    mean_kld: float | None = None
    p99_kld: float | None = None
    same_top: float | None = Field(None, description="tokens whose top-1 equals the f16 model's")
    passed: bool | None = Field(None, description="within the quality gate (None: reference or no gate)")


class LoraGguf(BaseModel):
    base_file: str
    adapter_file: str
    adapter_size_bytes: int
    top1_agreement: float = Field(description="llama.cpp base+adapter vs the HF model, validation tokens")
    max_abs_logit_diff: float
    modelfile: str | None = None
    modelfile_note: str | None = None


class ExportResult(BaseModel):
    files: list[GgufFile]
    selected: str = Field(description="the smallest quant within the gate (the smallest quant without a gate)")
    gate: QualityGate | None = None
    eval_tokens: int = 0
    imatrix: str | None = None
    lineage: str | None = None
    lora: LoraGguf | None = None
    modelfile: str | None
    modelfile_family: str | None = None
    modelfile_note: str | None = Field(None, description="why no Modelfile was written (the template proof failed)")


# bits per weight of each quant (llama.cpp's quantize table), for the disk-space check
QUANT_BITS = {"q8_0": 8.5, "q6_k": 6.56, "q5_k_m": 5.7, "q4_k_m": 4.89, "q4_0": 4.55}
OUTTYPE_BITS = {"f32": 32, "f16": 16, "bf16": 16}


def check_gguf(path: Path) -> None:
    """Fail fast on a file that is not a complete GGUF: missing, bad magic, unreadable header, data past EOF."""
    path = Path(path)
    if not path.is_file():
        raise FtxError("GGUF file not found", where=str(path))
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise FtxError(f"not a GGUF file (starts with {magic!r}, expected b'GGUF')", where=str(path))
    size = path.stat().st_size
    try:
        from gguf import GGUFReader

        tensors = GGUFReader(path).tensors
    except Exception as e:  # gguf-py raises assorted errors on a cut-off header or tensor table
        raise FtxError(f"corrupt or truncated GGUF ({type(e).__name__}: {e})", where=str(path)) from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in tensors), default=0)
    if end > size:
        raise FtxError(f"truncated GGUF: tensor data ends at byte {end}, the file has {size}", where=str(path))


def converter_architectures() -> set[str]:
    """HF architectures llama.cpp's converter (this vendored version) knows."""
    from . import llamacpp

    table = llamacpp.converter("hf").parent / "conversion" / "__init__.py"
    return set(re.findall(r'^\s*"(\w+)":\s*"\w+",', table.read_text(), re.M))


def check_architecture(model_dir: Path) -> str:
    import json

    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise FtxError("not a Hugging Face model directory (no config.json)", where=str(model_dir))
    arch = (json.loads(cfg.read_text()).get("architectures") or ["?"])[0]
    if arch not in converter_architectures():
        raise FtxError(f"architecture {arch} is not supported by llama.cpp's HF->GGUF converter in this version; "
                       "no GGUF can be exported", where=str(cfg))
    return arch


def check_disk(model_dir: Path, out: Path, cfg: "ExportConfig") -> None:
    """Enough free space for the reference GGUF and every quant (+10%), before anything is written."""
    fp32_bytes = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    params = fp32_bytes / 4  # merged models are saved in fp32 (bf16 on CUDA: then this over-estimates)
    need = params * (OUTTYPE_BITS[cfg.outtype] + sum(QUANT_BITS[q] for q in cfg.quants)) / 8 * 1.1
    free = shutil.disk_usage(out).free
    if free < need:
        raise FtxError(f"not enough disk space for the export: needs ~{need / 1e9:.1f} GB "
                       f"({cfg.outtype} + {', '.join(cfg.quants)}), {free / 1e9:.1f} GB free", where=str(out))


def gguf_metadata(name: str, lineage: str | None, base_model: str | None) -> dict:
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


def _convert(kind: str, args: list[str], what: Path, dst: Path) -> None:
    """Run llama.cpp's convert_<kind>_to_gguf.py offline; failure -> one-line error with its last output line."""
    from . import llamacpp

    cmd = [sys.executable, str(llamacpp.converter(kind)), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0 or not dst.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FtxError(f"convert_{kind}_to_gguf failed for {what}: {tail[0]}")


def convert_hf(model_dir: Path, dst: Path, outtype: str, name: str, metadata: dict | None = None) -> None:
    import json

    args = [str(model_dir), "--outfile", str(dst), "--outtype", outtype, "--model-name", name]
    if metadata:
        meta_file = dst.parent / "gguf_metadata.json"
        meta_file.write_text(json.dumps(metadata, indent=2))
        args += ["--metadata", str(meta_file)]
    _convert("hf", args, model_dir, dst)


def _tool(name: str, args: list, log: Path) -> str:
    """Run a llama.cpp tool; its output goes to `log` (appended) and is returned; failure -> one-line error."""
    from . import llamacpp

    proc = subprocess.run([str(llamacpp.tool(name)), *map(str, args)], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    with open(log, "a") as f:
        f.write(f"$ {name} {' '.join(map(str, args))}\n{text}\n")
    if proc.returncode != 0:
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        raise FtxError(f"{name} failed (exit {proc.returncode}): {last[0]} (full log: {log})")
    return text


def quantize(src: Path, dst: Path, quant: str, imatrix: Path | None = None) -> None:
    extra = ["--imatrix", imatrix] if imatrix else []
    _tool("llama-quantize", [*extra, src, dst, QUANT_FTYPES[quant], os.cpu_count() or 1], dst.parent / "tools.log")
    if not dst.exists():
        raise FtxError(f"llama-quantize {quant} wrote nothing for {src}")


def _log_softmax(x):
    import numpy as np

    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def convert_lora(adapter_dir: Path, base_dir: Path, dst: Path) -> None:
    """peft adapter -> GGUF LoRA with llama.cpp's convert_lora_to_gguf.py (base config from `base_dir`)."""
    _convert("lora", [str(adapter_dir), "--base", str(base_dir), "--outfile", str(dst), "--outtype", "f16"],
             adapter_dir, dst)


def gguf_scores(path: Path, seqs: list[list[int]], lora: Path | None = None):
    """Yield (logits [n, vocab] fp32, token ids) per sequence, from llama.cpp with every position's logits kept
    (with a GGUF LoRA adapter applied when `lora` is given)."""
    import numpy as np
    from llama_cpp import Llama

    n_ctx = max(map(len, seqs)) + 8
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                lora_path=str(lora) if lora else None)
    try:
        for ids in seqs:
            llm.reset()
            llm.eval(ids)
            yield np.array(llm.scores[: len(ids)], dtype=np.float32), ids
    finally:
        del llm


def gguf_logprobs(path: Path, seqs: list[list[int]]):
    for logits, ids in gguf_scores(path, seqs):
        yield _log_softmax(logits), ids


def save_reference(path: Path, seqs: list[list[int]], dst: Path) -> float:
    """Reference pass: log-probabilities at every position (fp16 on disk); returns the reference PPL."""
    import numpy as np

    store = None
    at, nll, n = 0, 0.0, 0
    for lp, ids in gguf_logprobs(path, seqs):
        if store is None:
            store = np.lib.format.open_memmap(dst, mode="w+", dtype=np.float16,
                                              shape=(sum(map(len, seqs)), lp.shape[1]))
        store[at:at + len(ids)] = lp
        nll -= float(lp[np.arange(len(ids) - 1), ids[1:]].sum())
        n, at = n + len(ids) - 1, at + len(ids)
    store.flush()
    return float(np.exp(nll / n))


def compare_to_reference(path: Path, seqs: list[list[int]], ref: Path, ref_ppl: float) -> dict[str, float]:
    """llama.cpp's quantization metrics (as `llama-perplexity --kl-divergence` defines them), on the exact token
    ids: KL(P_ref || P_quant) at every predicted position (mean, P99), same top-1 token, PPL(quant)/PPL(ref)."""
    import numpy as np

    store = np.load(ref, mmap_mode="r")
    at, nll, klds, same = 0, 0.0, [], 0
    for lp, ids in gguf_logprobs(path, seqs):
        n = len(ids) - 1  # positions that predict a next token
        rp = np.asarray(store[at:at + n], dtype=np.float32)
        q = lp[:n]
        klds.append((np.exp(rp) * (rp - q)).sum(-1))
        same += int((rp.argmax(-1) == q.argmax(-1)).sum())
        nll -= float(q[np.arange(n), ids[1:]].sum())
        at += len(ids)
    kld = np.concatenate(klds)
    ppl = float(np.exp(nll / len(kld)))
    return {"ppl": ppl, "ppl_ratio": ppl / ref_ppl, "mean_kld": float(kld.mean()),
            "p99_kld": float(np.percentile(kld, 99)), "same_top": same / len(kld)}


def within(f: GgufFile, gate: QualityGate) -> bool:
    checks = [(gate.max_mean_kld, f.mean_kld, "<="), (gate.max_ppl_ratio, f.ppl_ratio, "<="),
              (gate.max_p99_kld, f.p99_kld, "<="), (gate.min_same_top, f.same_top, ">=")]
    return all(limit is None or (v <= limit if op == "<=" else v >= limit) for limit, v, op in checks)


def eval_sequences(tok, files: list[Path | None]) -> list[list[int]]:
    """Token ids of the held-out and validation conversations, rendered with the model's own chat template
    (special tokens as the model sees them) - what the quality gate scores."""
    from .data import read_examples, render_example

    return [render_example(tok, ex, 4096)["input_ids"] for f in files if f for ex in read_examples(f)
            if "messages" in ex or "text" in ex]


def gguf_logits(path: Path, seqs: list[list[int]], lora: Path | None = None):
    """llama.cpp logits at every position of every sequence, concatenated: [total_tokens, vocab]."""
    import numpy as np

    return np.concatenate([logits for logits, _ in gguf_scores(path, seqs, lora)])


def export_lora(cfg: ExportConfig, base_dir: Path, adapter_dir: Path, seqs, ref, tok, name: str, num_ctx: int,
                out: Path) -> LoraGguf:
    """Base model -> f16 GGUF, adapter -> GGUF LoRA; llama.cpp base+adapter logits must match the HF model
    (the merged model, itself proven equal to base+adapter in peft by the merge stage)."""
    from .eval import compare_logits

    base_gguf, adapter_gguf = out / "base-f16.gguf", out / "adapter-f16.gguf"
    convert_hf(base_dir, base_gguf, "f16", f"{name}-base")
    convert_lora(adapter_dir, base_dir, adapter_gguf)
    cmp = compare_logits(gguf_logits(base_gguf, seqs, lora=adapter_gguf), ref)
    if cmp["top1_agreement"] < cfg.min_top1_agreement:
        raise FtxError(f"llama.cpp base + {adapter_gguf.name} agrees with the HF model on only "
                       f"{cmp['top1_agreement']:.1%} of validation tokens (< export.min_top1_agreement)")
    proof = modelfile.write(tok, base_dir, base_gguf, name, num_ctx, out / "Modelfile.adapter", adapter=adapter_gguf)
    return LoraGguf(base_file=base_gguf.name, adapter_file=adapter_gguf.name,
                    adapter_size_bytes=adapter_gguf.stat().st_size, top1_agreement=cmp["top1_agreement"],
                    max_abs_logit_diff=cmp["max_abs_diff"],
                    modelfile="Modelfile.adapter" if proof.proven else None, modelfile_note=proof.reason)


def run(cfg: ExportConfig, merged_dir: Path, val_file: Path, name: str, num_ctx: int, out: Path,
        heldout_file: Path | None = None, lineage: str | None = None, base_model: str | None = None,
        base_dir: Path | None = None, adapter_dir: Path | None = None, calib_file: Path | None = None) -> ExportResult:
    from rich.console import Console
    from rich.progress import Progress

    from .eval import check_sequences, compare_logits, token_logits
    from .train import load_base

    check_architecture(merged_dir)
    check_disk(merged_dir, out, cfg)
    model, tok = load_base(merged_dir, "lora", "cpu")
    seqs = check_sequences(tok, val_file, cfg.check_tokens)
    ref = token_logits(model, seqs).numpy()
    del model
    eval_seqs = eval_sequences(tok, [heldout_file, val_file])
    eval_tokens = sum(len(x) - 1 for x in eval_seqs)
    scratch = out / ".reference"
    scratch.mkdir()
    files, imatrix = [], None
    with Progress() as progress:
        task = progress.add_task("export", total=2 + 3 * len(cfg.quants) + cfg.imatrix)
        ref_gguf = out / f"model-{cfg.outtype}.gguf"
        progress.update(task, description=f"convert {cfg.outtype}")
        meta = gguf_metadata(name, lineage, base_model)
        convert_hf(merged_dir, ref_gguf, cfg.outtype, name, meta)
        progress.advance(task)
        progress.update(task, description=f"reference log-probs ({eval_tokens} tokens)")
        ref_ppl = save_reference(ref_gguf, eval_seqs, scratch / "ref.npy")
        files.append(GgufFile(name=cfg.outtype, file=ref_gguf.name, size_bytes=ref_gguf.stat().st_size,
                              top1_agreement=compare_logits(gguf_logits(ref_gguf, seqs), ref)["top1_agreement"],
                              ppl=ref_ppl))
        progress.advance(task)
        if files[0].top1_agreement < cfg.min_top1_agreement:
            raise FtxError(f"{files[0].file} agrees with the HF model on only {files[0].top1_agreement:.1%} of "
                           f"validation tokens (< export.min_top1_agreement {cfg.min_top1_agreement:.0%})")
        if cfg.imatrix:
            progress.update(task, description="importance matrix")
            if calib_file is None:
                raise FtxError("export.imatrix needs calibration text: the training split (run it from a recipe)")
            calib = scratch / "calibration.txt"
            calib.write_text("\n".join(tok.decode(x) for x in eval_sequences(tok, [calib_file])))
            imatrix = out / "imatrix.gguf"
            _tool("llama-imatrix", ["-m", ref_gguf, "-f", calib, "-o", imatrix, "-c", 128, "-t", os.cpu_count() or 1],
                  out / "tools.log")
            progress.advance(task)
        for q in cfg.quants:
            dst = out / f"model-{q}.gguf"
            progress.update(task, description=f"quantize {q}")
            quantize(ref_gguf, dst, q, imatrix)
            progress.advance(task)
            progress.update(task, description=f"top-1 vs HF {q}")
            top1 = compare_logits(gguf_logits(dst, seqs), ref)["top1_agreement"]
            progress.advance(task)
            progress.update(task, description=f"KL divergence {q}")
            st = compare_to_reference(dst, eval_seqs, scratch / "ref.npy", ref_ppl)
            f = GgufFile(name=q, file=dst.name, size_bytes=dst.stat().st_size, top1_agreement=top1, **st)
            f.passed = within(f, cfg.quality_gate) if cfg.quality_gate else None
            files.append(f)
            progress.advance(task)
    shutil.rmtree(scratch)
    quants = sorted(files[1:], key=lambda f: f.size_bytes)
    ok = [f for f in quants if f.passed is not False]
    if quants and not ok:
        table = "; ".join(f"{f.name}: KLD {f.mean_kld:.4f}, PPL ratio {f.ppl_ratio:.3f}, P99 KLD {f.p99_kld:.3f}, "
                          f"same top {f.same_top:.1%}" for f in quants)
        raise FtxError(f"no quant passes export.quality_gate ({cfg.quality_gate.model_dump(exclude_none=True)}): "
                       f"{table}; relax the budgets or add larger quants")
    selected = ok[0].name if ok else cfg.outtype
    mf_quant = selected if cfg.modelfile_quant == "auto" else cfg.modelfile_quant
    if mf_quant not in [f.name for f in files]:
        raise FtxError(f"export.modelfile_quant {mf_quant!r} is not among the exported files")
    with Console(stderr=True).status(f"Modelfile: proving the chat template on model-{mf_quant}.gguf"):
        proof = modelfile.write(tok, merged_dir, out / f"model-{mf_quant}.gguf", name, num_ctx, out / "Modelfile")
    lora = None
    if cfg.lora_adapter:
        if base_dir is None or adapter_dir is None:
            raise FtxError("export.lora_adapter needs the base model and the adapter (run it from a recipe)")
        lora = export_lora(cfg, base_dir, adapter_dir, seqs, ref, tok, name, num_ctx, out)
    return ExportResult(lora=lora, files=files, selected=selected, gate=cfg.quality_gate, eval_tokens=eval_tokens,
                        imatrix=imatrix.name if imatrix else None, lineage=lineage,
                        modelfile="Modelfile" if proof.proven else None, modelfile_family=proof.family,
                        modelfile_note=proof.reason)
