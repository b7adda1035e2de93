"""GGUF files: checks (complete file, known architecture), llama.cpp's converters and tools, and scoring a GGUF
through the llama.cpp bindings (logits at every position of exact token ids).

Nothing is compiled here: converter, gguf-py and tools come from the llama-cpp-python sdist (ftx.core.llamacpp).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from .errors import FtxError

# GGUF value types (gguf-py's GGUFValueType) -> struct format of a scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class Header:
    """What a GGUF's header says: its metadata (arrays only when asked for) and where its tensor data ends."""

    def __init__(self, fields: dict, data_end: int, size: int, tensors: list | None = None):
        self.fields, self.data_end, self.size = fields, data_end, size
        self.tensors = tensors or []  # (name, dims, ggml type name, bytes) per tensor, in file order


def read_header(path: Path, arrays: tuple[str, ...] = ()) -> Header:
    """Parse a GGUF's header in one pass over a memory map: every scalar and string value, the arrays named in
    `arrays`, and the tensor table (for where the data ends). gguf-py's GGUFReader builds every array (a 50k-token
    vocabulary several times over) and took ~10 s per file here; this takes milliseconds. Raises ValueError or
    struct.error on a file that is cut short."""
    import mmap
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            value = struct.unpack_from("<" + fmt, m, pos)
            pos += struct.calcsize("<" + fmt)
            return value[0]

        def string() -> str:
            nonlocal pos
            n = take("Q")
            if pos + n > len(m):
                raise ValueError("string past the end of the file")
            pos += n
            return bytes(m[pos - n : pos]).decode("utf-8", errors="replace")

        def value(vtype: int, keep: bool):
            nonlocal pos
            if vtype in _SCALARS:
                return take(_SCALARS[vtype])
            if vtype == _STRING:
                return string()
            if vtype != _ARRAY:
                raise ValueError(f"unknown GGUF value type {vtype}")
            itype, count = take("I"), take("Q")
            if not keep and itype in _SCALARS:  # skip fixed-size items without reading them
                pos += count * struct.calcsize(_SCALARS[itype])
                return None
            if not keep and itype == _STRING:  # skip strings by their lengths alone
                unpack = struct.Struct("<Q").unpack_from
                for _ in range(count):
                    pos += 8 + unpack(m, pos)[0]
                return None
            items = [value(itype, keep) for _ in range(count)]
            return items if keep else None

        if bytes(m[:4]) != b"GGUF":
            raise ValueError("bad magic")
        pos = 4
        version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
        if version < 2 or n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise ValueError(f"implausible header (version {version}, {n_tensors} tensors, {n_kv} keys)")
        fields = {}
        for _ in range(n_kv):
            key = string()
            fields[key] = value(take("I"), keep=key in arrays)
        end, tensors = 0, []
        for _ in range(n_tensors):
            name = string()
            dims = [take("Q") for _ in range(take("I"))]
            qtype = GGMLQuantizationType(take("I"))
            block, type_size = GGML_QUANT_SIZES[qtype]
            offset = take("Q")
            n = 1
            for d in dims:
                n *= d
            end = max(end, offset + n // block * type_size)
            tensors.append((name, dims, qtype.name.lower(), n // block * type_size))
        align = fields.get("general.alignment") or 32
        data_start = (pos + align - 1) // align * align
        return Header(fields, data_start + end, len(m), tensors)


def check_gguf(path: Path) -> Header:
    """Fail fast on a file that is not a complete GGUF: missing, bad magic, unreadable header, data past EOF."""
    path = Path(path)
    if not path.is_file():
        raise FtxError("GGUF file not found", where=str(path))
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise FtxError(f"not a GGUF file (starts with {magic!r}, expected b'GGUF')", where=str(path))
    try:
        header = read_header(path)
    except Exception as e:  # noqa: BLE001 - a cut-off header fails in assorted ways (struct, value, key errors)
        raise FtxError(f"corrupt or truncated GGUF ({type(e).__name__}: {e})", where=str(path)) from None
    if header.data_end > header.size:
        raise FtxError(
            f"truncated GGUF: tensor data ends at byte {header.data_end}, the file has {header.size}", where=str(path)
        )
    return header


def fields(path: Path, keys: tuple[str, ...]) -> dict:
    """Metadata values of a GGUF (those of `keys` that are present)."""
    found = read_header(path, arrays=keys).fields
    return {k: found[k] for k in keys if k in found}


def converter_architectures() -> set[str]:
    """HF architectures llama.cpp's converter (this vendored version) knows."""
    from . import llamacpp

    table = llamacpp.converter("hf").parent / "conversion" / "__init__.py"
    return set(re.findall(r'^\s*"(\w+)":\s*"\w+",', table.read_text(), re.M))


def check_architecture(model_dir: Path) -> str:
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise FtxError("not a Hugging Face model directory (no config.json)", where=str(model_dir))
    arch = (json.loads(cfg.read_text()).get("architectures") or ["?"])[0]
    if arch not in converter_architectures():
        raise FtxError(
            f"architecture {arch} is not supported by llama.cpp's HF->GGUF converter in this version; "
            "no GGUF can be exported",
            where=str(cfg),
        )
    return arch


def _convert(kind: str, args: list[str], what: Path, dst: Path) -> None:
    """Run llama.cpp's convert_<kind>_to_gguf.py offline; failure -> one-line error with its last output line."""
    from . import llamacpp

    cmd = [sys.executable, str(llamacpp.converter(kind)), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0 or not dst.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FtxError(f"convert_{kind}_to_gguf failed for {what}: {tail[0]}")


def convert_hf(model_dir: Path, dst: Path, outtype: str, name: str, metadata: dict | None = None) -> None:
    """HF model directory -> GGUF (`outtype` f16 | bf16 | f32 | q8_0), with extra general.* metadata."""
    args = [str(model_dir), "--outfile", str(dst), "--outtype", outtype, "--model-name", name]
    if metadata:
        meta_file = dst.parent / f"{dst.stem}.metadata.json"
        meta_file.write_text(json.dumps(metadata, indent=2))
        args += ["--metadata", str(meta_file)]
    _convert("hf", args, model_dir, dst)


def convert_lora(adapter_dir: Path, base_dir: Path, dst: Path) -> None:
    """peft adapter -> GGUF LoRA with llama.cpp's convert_lora_to_gguf.py (base config from `base_dir`)."""
    _convert(
        "lora", [str(adapter_dir), "--base", str(base_dir), "--outfile", str(dst), "--outtype", "f16"], adapter_dir, dst
    )


def run_tool(name: str, args: list, log: Path) -> str:
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


def log_softmax(x):
    import numpy as np

    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def scores(path: Path, seqs: list[list[int]], lora: Path | None = None):
    """Yield (logits [n, vocab] fp32, token ids) per sequence, from llama.cpp with every position's logits kept
    (with a GGUF LoRA adapter applied when `lora` is given)."""
    import numpy as np
    from llama_cpp import Llama

    n_ctx = max(map(len, seqs)) + 8
    llm = Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        verbose=False,
        lora_path=str(lora) if lora else None,
    )
    try:
        for ids in seqs:
            llm.reset()
            llm.eval(ids)
            yield np.array(llm.scores[: len(ids)], dtype=np.float32), ids
    finally:
        del llm


def logprobs(path: Path, seqs: list[list[int]]):
    """Yield (log-probabilities [n, vocab], token ids) per sequence."""
    for logits, ids in scores(path, seqs):
        yield log_softmax(logits), ids


def logits(path: Path, seqs: list[list[int]], lora: Path | None = None):
    """llama.cpp logits at every position of every sequence, concatenated: [total_tokens, vocab]."""
    import numpy as np

    return np.concatenate([x for x, _ in scores(path, seqs, lora)])


def generate(path: Path, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], dict[int, str]]:
    """Greedy answers to exact prompt token ids, each up to and including the first end-of-generation token
    (llama.cpp's own test, llama_vocab_is_eog: what llama-server stops on) or `max_tokens` tokens. Returns the
    answers and the model's end-of-generation tokens {id: text}."""
    import llama_cpp
    from llama_cpp import Llama

    n_ctx = max(map(len, prompts)) + max_tokens + 8
    # every core for decoding (the bindings' default is half of them; prompts already get all)
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=os.cpu_count() or 1, verbose=False)
    try:
        vocab = llm._model.vocab  # the bindings' high-level API has no is_eog
        eog = {
            t: llm.detokenize([t], special=True).decode("utf-8", errors="replace")
            for t in range(llm.n_vocab())
            if llama_cpp.llama_vocab_is_eog(vocab, t)
        }
        answers = []
        for ids in prompts:
            out = []
            for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                out.append(t)
                if t in eog or len(out) >= max_tokens:
                    break
            answers.append(out)
        return answers, eog
    finally:
        del llm
