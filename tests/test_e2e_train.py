"""End to end: QLoRA (NF4, with packing, the attention preset, gradient checkpointing, TensorBoard and MLflow in the
same short run) and DPO after SFT, both continuing from the quickstart run's cache."""

import json
from pathlib import Path

import numpy as np
import pytest

from .conftest import DDP, RECIPE, ftx_run

pytestmark = pytest.mark.e2e


def test_qlora_trains_a_standard_peft_adapter(quickstart_run, hf, qlora_run, base_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftx.core.chat import read_examples
    from ftx.core.models import load_base, response_loss

    nf4, _ = load_base(base_dir, "qlora", "cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in nf4.modules())  # really 4-bit weights
    del nf4
    run_dir, manifest = qlora_run
    assert manifest["stages"]["data"]["cached"] and not manifest["stages"]["train"]["cached"]
    tr = json.loads((run_dir / "run_card.json").read_text())["train"]
    rows = [json.loads(line) for line in (run_dir / "stages" / "train" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]  # steps 0, 2, 4, on the NF4 model like training
    assert len(val) == 3 and val[-1] < val[0] and tr["val_loss"] <= val[-1]
    assert tr["packing"] and tr["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert (
        sorted(json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["target_modules"])
        == tr["target_modules"]
    )
    assert quickstart_run["card"]["train"]["packing"] is False  # auto on CPU: padded (SDPA has no varlen kernel)
    assert all(r["peak_memory_mb"] > 100 for r in rows) and any("grad_norm" in r for r in rows)
    # TensorBoard event file and MLflow file store, both holding the training loss
    key = manifest["stages"]["train"]["key"]
    events = list((quickstart_run["out"] / "tensorboard" / "quickstart" / key).glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and len(acc.Scalars("train/loss")) == 4
    mlflow_loss = list((quickstart_run["out"] / "mlruns").glob("*/*/metrics/loss"))
    assert len(mlflow_loss) == 1 and len(mlflow_loss[0].read_text().splitlines()) == 4
    # the adapter is plain peft format: on the full-precision base it lowers the validation loss it trained on
    tok = hf[0]
    val_rows = read_examples(run_dir / "stages" / "data" / "val.jsonl")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), run_dir / "adapter"
    ).eval()
    tuned = response_loss(model, tok, val_rows, 512)
    with model.disable_adapter():
        untuned = response_loss(model, tok, val_rows, 512)
    assert untuned - tuned > 0.5 * (val[0] - val[-1]) > 0, (tuned, untuned, val)  # most of the gain training saw


def test_dpo_after_sft_widens_the_preference_margin(quickstart_run, hf, base_dir):
    """DPO continues the SFT adapter (reference: the SFT model). Checked independently: the chosen-minus-rejected
    log-probability margin on the held-out pairs, recomputed here with HF+peft, grows, and matches the stage's.
    SFT and DPO run distributed here (DDP, 2 workers through torchrun: train.distributed applies to both stages;
    the SFT run is test_e2e_distributed's, cached), so the DPO stage's launcher path is the one exercised."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftx.core.chat import read_examples
    from ftx.stages.dpo import preference_margins

    prefs = Path(RECIPE).parent / "data" / "quickstart_prefs.jsonl"
    run_dir, manifest = ftx_run(
        quickstart_run["out"],
        f"dpo.data.path={prefs}",
        "dpo.max_steps=4",
        "dpo.eval_every=4",
        "dpo.learning_rate=3e-4",
        DDP,
        "--until",
        "dpo",
    )
    assert not manifest["stages"]["dpo"]["cached"]
    assert manifest["inputs"]["dpo.data.path"]["sha256"]
    d = json.loads((run_dir / "run_card.json").read_text())["dpo"]
    assert d["steps"] == 4 and d["pairs_val"] >= 10
    spec = json.loads((run_dir / "stages" / "dpo" / "launch-spec.json").read_text())
    assert spec["distributed"]["nproc_per_node"] == 2  # the workers ran it
    assert d["dpo_logp_margin"] > d["sft_logp_margin"] + 0.5
    assert (run_dir / "adapter").resolve().parent.name == manifest["stages"]["dpo"]["key"]  # the run's adapter is DPO's
    assert not (run_dir / "adapter" / "ref").exists()  # trl's frozen reference copy is not shipped
    pairs = read_examples(run_dir / "stages" / "dpo" / "val.jsonl")
    tok = hf[0]

    def logp(model, prompt, reply):  # written here from the chat template, not with ftx's renderer
        head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tok(head + reply, add_special_tokens=False)["input_ids"]
        n = len(tok(head, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
        return sum(lp[i - 1, ids[i]].item() for i in range(n, len(ids)))

    mine, ftx_margins = [], []
    for adapter in (quickstart_run["dir"] / "adapter", run_dir / "adapter"):
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, adapter).eval()
        mine.append([logp(model, p["prompt"], p["chosen"]) - logp(model, p["prompt"], p["rejected"]) for p in pairs])
        ftx_margins.append(preference_margins(model, tok, pairs, 512)[1])
    # DPO widened the margin on pairs it never trained on: on average and for the typical pair
    assert np.mean(mine[1]) > np.mean(mine[0]) + 0.5 and np.median(mine[1]) > np.median(mine[0])
    assert ftx_margins[0] == pytest.approx(d["sft_logp_margin"], abs=1e-2)  # the card reports the saved adapters
    assert ftx_margins[1] == pytest.approx(d["dpo_logp_margin"], abs=1e-2)
    assert "## Preference tuning" in (run_dir / "run_card.md").read_text()
