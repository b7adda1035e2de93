"""Bad input to export/merge/serve fails before any work with one line naming the file: a truncated or
non-GGUF file, an architecture llama.cpp cannot convert, an adapter trained on another base, too little disk."""

import json
import re
import subprocess
from collections import namedtuple

import pytest

from ftx.core import basemodel
from ftx.core import gguf as G
from ftx.core.adapters import check_fits_base
from ftx.core.errors import FtxError
from ftx.formats import gguf as fmt

from .conftest import FTX


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    """A real GGUF: the packaged SmolLM2 file."""
    return basemodel.packaged_gguf("smollm2-135m-instruct")


def test_complete_gguf_passes_and_broken_ones_fail(gguf, tmp_path):
    G.check_gguf(gguf)
    cut = tmp_path / "cut.gguf"
    with open(gguf, "rb") as src:
        cut.write_bytes(src.read(gguf.stat().st_size // 2))
    with pytest.raises(FtxError, match="truncated GGUF|corrupt or truncated") as e:
        G.check_gguf(cut)
    assert str(cut) in str(e.value)
    head = tmp_path / "head.gguf"
    with open(gguf, "rb") as src:
        head.write_bytes(src.read(64))
    with pytest.raises(FtxError, match="corrupt or truncated|truncated GGUF"):
        G.check_gguf(head)
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(FtxError, match="not a GGUF file"):
        G.check_gguf(text)


def test_ftx_serve_refuses_a_truncated_gguf_before_starting(gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(gguf, "rb") as src:
        cut.write_bytes(src.read(gguf.stat().st_size - 1000))
    proc = subprocess.run(
        [*FTX, "serve", "--gguf", str(cut), "--port", "0"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "truncated GGUF" in proc.stderr and str(cut) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unsupported_architecture_is_refused_before_conversion(tmp_path):
    assert "LlamaForCausalLM" in G.converter_architectures()
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MadeUpForCausalLM"]}))
    with pytest.raises(FtxError, match="MadeUpForCausalLM is not supported"):
        G.check_architecture(tmp_path)


def test_adapter_from_another_base_is_refused(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "adapter")
    smol = basemodel.resolve("smollm2-135m-instruct")
    with pytest.raises(FtxError, match="trained on another base model") as e:
        check_fits_base(tmp_path / "adapter", smol)
    assert re.search(r"_proj has (in|out) features (32|64), the base .* has (576|1536|192)", str(e.value))
    assert str(tmp_path / "adapter") in str(e.value)
    (tmp_path / "base").mkdir()
    cfg.save_pretrained(tmp_path / "base")
    check_fits_base(tmp_path / "adapter", tmp_path / "base")  # its own base: fine


def test_too_little_disk_space_is_refused(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 4_000_000)  # ~1M fp32 parameters
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(fmt.shutil, "disk_usage", lambda p: Usage(10**12, 0, 1_000_000))
    with pytest.raises(FtxError, match="not enough disk space"):
        fmt.check_disk(fmt.GgufSettings(), tmp_path, tmp_path)
    monkeypatch.setattr(fmt.shutil, "disk_usage", lambda p: Usage(10**12, 0, 10**10))
    fmt.check_disk(fmt.GgufSettings(), tmp_path, tmp_path)


def _adapter(d, keys: dict, **config):
    """A peft adapter directory with these tensors (name -> shape) and adapter_config.json."""
    import torch
    from safetensors.torch import save_file

    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA", **config}))
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(d / "adapter_model.safetensors"))
    return d


def test_adapter_report_says_where_an_adapter_can_ship(tmp_path):
    from ftx.core.adapters import TARGETS, check_for, portability

    layer = "base_model.model.model.layers.0.self_attn"
    plain = _adapter(
        tmp_path / "plain",
        {f"{layer}.q_proj.lora_A.weight": (4, 8), f"{layer}.q_proj.lora_B.weight": (8, 4)},
        target_modules=["q_proj"],
    )
    r = portability(plain, trained_4bit=True)
    assert (r["rank"], r["alpha"], r["lora_modules"], r["trained_on"]) == (4, 8, ["q_proj"], "4-bit (QLoRA)")
    assert [t["target"] for t in r["targets"]] == list(TARGETS) and all(t["supported"] for t in r["targets"])
    assert "4-bit base" in r["targets"][0]["reason"]
    # modules_to_save: a full copy of lm_head, which neither llama.cpp's converter nor vLLM takes; merging does
    saved = _adapter(
        tmp_path / "saved",
        {
            f"{layer}.q_proj.lora_A.weight": (4, 8),
            f"{layer}.q_proj.lora_B.weight": (8, 4),
            "base_model.model.lm_head.weight": (16, 8),
        },
        target_modules=["q_proj"],
        modules_to_save=["lm_head"],
    )
    r = portability(saved)
    assert [t["supported"] for t in r["targets"]] == [True, False, False, False] and r["full_tensors"] == [
        "lm_head.weight"
    ]
    assert "modules_to_save" in r["targets"][1]["reason"] and "classifier/score" in r["targets"][3]["reason"]
    with pytest.raises(FtxError, match="cannot be served by vLLM --lora-modules: vLLM loads modules_to_save only"):
        check_for(TARGETS[3], "mine", saved)
    # LoRA on lm_head of a model whose embeddings are tied: llama.cpp's converter drops it, vLLM takes it
    head = _adapter(
        tmp_path / "head",
        {"base_model.model.lm_head.lora_A.weight": (4, 8), "base_model.model.lm_head.lora_B.weight": (16, 4)},
        target_modules=["lm_head"],
    )
    r = portability(head, tied_embeddings=True)
    assert r["embeddings"] == ["lm_head"] and [t["supported"] for t in r["targets"]] == [True, False, False, True]
