"""Where the llama.cpp pieces live: built once by scripts/build_llama_cpp.sh (at `make` time), never at export.

All come from the llama-cpp-python sdist's vendored llama.cpp, so the Python bindings, the HF->GGUF
converter, gguf-py and the native tools (llama-server, llama-quantize, ...) share one llama.cpp commit.
"""

from __future__ import annotations

from pathlib import Path

from .cache import cache_root
from .errors import FtxError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"


def home() -> Path:
    path = cache_root() / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION
    if not (path / ".complete").exists():
        raise FtxError(f"llama.cpp tools not built at {path}: run `make setup` (scripts/setup_env.sh)")
    return path


def tool(name: str) -> Path:
    path = home() / "bin" / name
    if not path.exists():
        raise FtxError(f"{path}: missing llama.cpp tool; run `make setup`")
    return path


def converter(kind: str = "hf") -> Path:
    """convert_hf_to_gguf.py or convert_lora_to_gguf.py (each puts its sibling gguf-py on sys.path)."""
    return home() / "src" / "vendor" / "llama.cpp" / f"convert_{kind}_to_gguf.py"
