"""Memory planner: parameter counts are exact, the terms behave, and on this CPU the estimate is within 25%
of the peak RSS measured while really training SmolLM2 (forward, backward and AdamW steps)."""

import json

import pytest

from ftx import plan
from ftx.core import basemodel


@pytest.fixture(scope="module")
def smol():
    return str(basemodel.resolve("smollm2-135m-instruct"))


def test_parameter_counts_match_the_real_models(smol):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
    assert plan.arch_of(smol).params()["total"] == sum(p.numel() for p in model.parameters())
    assert plan.arch_of("smollm2-135m-instruct") == plan.arch_of(smol)
    # published sizes: Llama-3.1-8B 8.03B, Qwen2.5-7B 7.62B, Mistral-7B 7.25B
    for name, published in (
        ("meta-llama/Llama-3.1-8B-Instruct", 8.03e9),
        ("Qwen/Qwen2.5-7B-Instruct", 7.62e9),
        ("mistralai/Mistral-7B-Instruct-v0.3", 7.25e9),
    ):
        assert plan.arch_of(name).params()["total"] == pytest.approx(published, rel=0.01), name


def test_terms_move_the_right_way():
    base = dict(model="meta-llama/Llama-3.1-8B-Instruct", seq_len=2048, batch_size=1, device="cuda")  # a 4090
    q = plan.plan(plan.PlanConfig(**base, method="qlora", gradient_checkpointing=True))
    lo = plan.plan(plan.PlanConfig(**base, method="lora", gradient_checkpointing=True))
    full = plan.plan(plan.PlanConfig(**base, method="full", gradient_checkpointing=True))
    nogc = plan.plan(plan.PlanConfig(**base, method="qlora"))
    assert q.terms_mb["weights"] < lo.terms_mb["weights"] / 2.5  # 4.1 bits vs 16 on the linear layers
    assert q.fits and not full.fits and full.max_batch_size == 0  # 8B QLoRA fits a 24 GB card, full FT does not
    assert nogc.terms_mb["activations"] > 5 * q.terms_mb["activations"]
    assert q.max_batch_size >= nogc.max_batch_size >= 1
    assert q.trainable_params == 32 * 16 * sum(i + o for i, o in plan.arch_of(base["model"]).linear_shapes().values())


def test_per_device_memory_under_ddp_zero_and_fsdp():
    """Full fine-tuning of an 8B model on 8 GPUs: DDP replicates everything (plus its gradient buckets), ZeRO-2
    shards gradients and optimizer state, ZeRO-3/FSDP also the weights (plus the layers gathered for compute)."""
    base = dict(model="meta-llama/Llama-3.1-8B-Instruct", seq_len=2048, batch_size=1, device="cuda", method="full")
    base |= dict(gradient_checkpointing=True, budget_gb=80)
    one = plan.plan(plan.PlanConfig(**base)).terms_mb
    ddp = plan.plan(plan.PlanConfig(**base, strategy="ddp", world_size=8))
    z2 = plan.plan(plan.PlanConfig(**base, strategy="deepspeed_zero2", world_size=8))
    z3 = plan.plan(plan.PlanConfig(**base, strategy="deepspeed_zero3", world_size=8))
    fsdp = plan.plan(plan.PlanConfig(**base, strategy="fsdp", world_size=8))
    assert ddp.terms_mb["ddp_buckets"] == ddp.terms_mb["gradients"] == one["gradients"]
    assert ddp.terms_mb["weights"] == one["weights"] and ddp.total_mb > plan.plan(plan.PlanConfig(**base)).total_mb
    assert z2.terms_mb["optimizer"] == pytest.approx(one["optimizer"] / 8, abs=0.1)
    assert z2.terms_mb["weights"] == one["weights"]
    assert z3.terms_mb["weights"] == pytest.approx(one["weights"] / 8, abs=0.1)
    assert z3.terms_mb["gathered_layers"] == pytest.approx(2 * one["weights"] / 32, abs=0.1)
    assert z3.terms_mb == fsdp.terms_mb
    # 8B full fine-tuning on 80 GB GPUs: replicated (DDP: ~106 GB per GPU) it does not fit, sharded it does
    assert not ddp.fits and z2.fits and z3.fits
    assert z3.total_mb < z2.total_mb < ddp.total_mb


@pytest.mark.e2e
@pytest.mark.parametrize("method,seq_len,batch", [("lora", 128, 2), ("qlora", 128, 2)])
def test_estimate_within_25_percent_of_measured_peak_rss(smol, method, seq_len, batch):
    measured = plan.measure(smol, method, seq_len, batch, lora_r=8)["peak_rss_mb"]
    est = plan.plan(
        plan.PlanConfig(model=smol, method=method, seq_len=seq_len, batch_size=batch, lora_r=8, device="cpu")
    ).total_mb
    assert abs(est / measured - 1) <= 0.25, (est, measured)


def test_plan_of_a_recipe_uses_this_machine_and_the_data_lengths():
    """On this CPU machine the plan is for the CPU and its RAM, and seq_len comes from the data's real lengths (the
    quickstart's rows are ~60 tokens, not max_seq_len 512)."""
    import subprocess

    import psutil

    from .conftest import FTX, RECIPE

    proc = subprocess.run([*FTX, "plan", str(RECIPE), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert p["config"]["device"] == "cpu"
    assert p["config"]["budget_gb"] == pytest.approx(psutil.virtual_memory().total / 2**30, rel=0.01)
    assert 30 < p["config"]["seq_len"] < 128  # the expected longest row of a batch of 8, not 512
