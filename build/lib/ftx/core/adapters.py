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
