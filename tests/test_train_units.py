"""Training building blocks on a tiny random llama (fast): padding-free packing is exact, presets resolve,
and configurations that cannot work on this machine fail with a clear message before any work."""

import pytest
import torch

from ftx.core.chat import collate
from ftx.core.errors import FtxError
from ftx.stages import train


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="sdpa",
        use_cache=False,
    )
    return LlamaForCausalLM(cfg).float()


def rows():
    g = torch.Generator().manual_seed(1)
    out = []
    for n, prompt in ((11, 5), (4, 2), (17, 9)):
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_batch_gives_the_padded_batch_loss_and_gradients(tiny):
    padded = collate(rows(), pad_id=0)
    packed = train.collate_packed(rows())
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows()))
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())
    l1, g1 = loss_and_grads(tiny, padded)
    l2, g2 = loss_and_grads(tiny, packed)
    assert l1 == pytest.approx(l2, rel=1e-5)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_rows_do_not_attend_to_each_other(tiny):
    a, b, c = rows()
    changed = {**a, "input_ids": [(t + 7) % 128 for t in a["input_ids"]]}
    with torch.no_grad():
        l1 = tiny(**{k: v for k, v in train.collate_packed([a, b, c]).items() if k != "labels"}).logits
        l2 = tiny(**{k: v for k, v in train.collate_packed([changed, b, c]).items() if k != "labels"}).logits
        alone = tiny(input_ids=torch.tensor([b["input_ids"]])).logits
    n = len(a["input_ids"])
    assert not torch.allclose(l1[0, :n], l2[0, :n])  # the changed row's own logits move ...
    torch.testing.assert_close(l1[0, n:], l2[0, n:])  # ... nothing after it does
    torch.testing.assert_close(l1[0, n : n + len(b["input_ids"])], alone[0], rtol=1e-4, atol=1e-5)


def test_target_module_presets(tiny):
    assert train.target_modules(tiny, "attention") == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert train.target_modules(tiny, "mlp") == ["down_proj", "gate_proj", "up_proj"]
    assert "lm_head" not in train.target_modules(tiny, "all-linear")
    assert len(train.target_modules(tiny, "all-linear")) == 7
    with pytest.raises(FtxError, match="wq not in this model"):
        train.target_modules(tiny, ["q_proj", "wq"])


def test_cpu_refuses_gpu_only_choices_up_front():
    with pytest.raises(FtxError, match="needs CUDA"):
        train.pick_optimizer(train.TrainConfig(optimizer="paged_adamw_8bit"), "cpu")
    with pytest.raises(FtxError, match="unsloth needs a CUDA GPU"):
        train.pick_backend(train.TrainConfig(backend="unsloth"), "cpu")
    assert train.pick_backend(train.TrainConfig(), "cpu") == "hf"
    assert train.pick_optimizer(train.TrainConfig(method="qlora"), "cpu") == "adamw_torch"
    assert train.pick_optimizer(train.TrainConfig(method="qlora"), "cuda") == "paged_adamw_8bit"


def test_progress_prints_plain_lines_when_the_output_is_not_a_terminal():
    import io

    from ftx.core.progress import Progress

    out = io.StringIO()  # not a terminal: plain lines at the cadence (0 s here), the final state once
    p = Progress("train", 10, every_s=0, stream=out)
    p.update(3, "loss=2.1")
    p.update(10, "loss=0.5")
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train 3/10 loss=2.1") and "ETA" in lines[0]
    assert lines[-1].startswith("train 10/10 loss=0.5") and len(lines) == 2
