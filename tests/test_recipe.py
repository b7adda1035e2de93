"""Recipe validation and overrides (pure logic, no model): every problem is one line naming file:line and the key,
found when the recipe loads, not after minutes of work. (The runner's keys and caching: test_runner.py.)"""

import re

import pytest

from ftx import pipeline
from ftx.card import redacted
from ftx.core.errors import FtxError

from .conftest import RECIPE


def error_of(path, overrides=()):
    with pytest.raises(FtxError) as e:
        pipeline.load(path, overrides)
    return str(e.value)


def line_of(path, needle):
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_quickstart_recipe_is_valid_and_paths_resolve():
    r = pipeline.load(RECIPE)
    assert r.name == "quickstart"
    assert r.data.path.is_absolute() and r.data.path.is_file()
    assert r.train.method == "lora" and r.export.gguf.quants == ["q8_0", "q6_k", "q4_k_m"]
    assert r.export.quality_gate.max_mean_kld == 0.05 and r.serve.quant == "auto"
    assert r.bench.hardware.name == "cloud-2vcpu.yaml" and r.bench.hardware.is_file()  # a packaged profile by name


def test_overrides_parse_types_and_nested_keys():
    r = pipeline.load(
        RECIPE,
        [
            "train.max_steps=7",
            "train.learning_rate=5e-4",
            "train.lora.r=4",
            "bench.concurrency=2",
            "serve.host=0.0.0.0",
        ],
    )
    assert r.train.max_steps == 7 and isinstance(r.train.max_steps, int)
    assert r.train.learning_rate == 5e-4
    assert r.train.lora.r == 4 and r.bench.concurrency == 2 and r.serve.host == "0.0.0.0"


def test_unknown_key_names_file_line_and_key_path(recipe_copy):
    text = recipe_copy.read_text().replace("  max_steps: 60", "  max_steps: 60\n  learning_rte: 0.1")
    recipe_copy.write_text(text)
    msg = error_of(recipe_copy)
    assert msg == f"{recipe_copy}:{line_of(recipe_copy, 'learning_rte')}: train.learning_rte: unknown key"


def test_wrong_type_names_file_line_and_key_path(recipe_copy):
    recipe_copy.write_text(recipe_copy.read_text().replace("batch_size: 8", "batch_size: eight"))
    msg = error_of(recipe_copy)
    assert msg.startswith(f"{recipe_copy}:{line_of(recipe_copy, 'batch_size')}: train.batch_size: ")
    assert "integer" in msg and "\n" not in msg


def test_unknown_top_level_section(recipe_copy):
    recipe_copy.write_text(recipe_copy.read_text() + "\ndeploy:\n  replicas: 2\n")
    assert error_of(recipe_copy) == f"{recipe_copy}:{line_of(recipe_copy, 'deploy:')}: deploy: unknown key"


def test_missing_required_key(recipe_copy):
    recipe_copy.write_text(recipe_copy.read_text().replace("base_model: smollm2-135m-instruct", ""))
    assert re.fullmatch(rf"{re.escape(str(recipe_copy))}: base_model: missing required key", error_of(recipe_copy))


def test_missing_dataset_file_names_line(recipe_copy):
    recipe_copy.write_text(recipe_copy.read_text().replace("data/quickstart.jsonl", "data/nope.jsonl"))
    msg = error_of(recipe_copy)
    assert msg.startswith(f"{recipe_copy}:{line_of(recipe_copy, 'nope.jsonl')}: data.path: file not found")


def test_bad_override_is_reported_as_override():
    assert error_of(RECIPE, ["train.max_stepz=3"]) == "override 'train.max_stepz=3': train.max_stepz: unknown key"
    assert "train.max_steps" in error_of(RECIPE, ["train.max_steps=many"])
    assert "expected key.path=value" in error_of(RECIPE, ["train.max_steps"])
    assert "export.gguf.quants.0: Input should be 'q8_0'" in error_of(RECIPE, ["export.gguf.quants=[q3_xyz]"])


def test_invalid_yaml_has_line(recipe_copy):
    recipe_copy.write_text("name: x\ndata: [unclosed\n")
    assert re.match(rf"{re.escape(str(recipe_copy))}:\d+: invalid YAML", error_of(recipe_copy))


def test_api_key_is_redacted_from_manifest_config():
    r = pipeline.load(RECIPE, ["serve.api_key=s3cret"])
    assert redacted(r)["serve"]["api_key"] == "***"


@pytest.mark.parametrize("path", sorted((RECIPE.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    r = pipeline.load(path)
    assert r.data.path.is_file()
    if r.dpo:
        assert r.dpo.data.path.is_file() and r.dpo.data.format == "preference"


def test_gpu_recipe_is_planned_to_fit_a_24gb_card():
    from ftx.plan import PlanConfig, plan, recipe_plan_config

    cfg = recipe_plan_config(pipeline.load(RECIPE.parent / "llama3.1-8b-qlora.yaml"), "cuda")
    assert cfg["optimizer"] == "adamw_8bit" and cfg["method"] == "qlora" and cfg["seq_len"] == 2048
    p = plan(PlanConfig(**cfg, device="cuda"))
    assert p.fits and p.total_mb < 24 * 1024


def test_missing_dpo_data_file_names_the_key_and_line(recipe_copy):
    dpo = recipe_copy.parent / "dpo.yaml"
    dpo.write_text(dpo.read_text().replace("data/quickstart_prefs.jsonl", "data/nope.jsonl"))
    msg = error_of(dpo)
    assert f"{dpo}:{line_of(dpo, 'nope.jsonl')}" in msg and "dpo.data.path: file not found" in msg


def test_dpo_section_rejects_non_preference_formats(recipe_copy):
    msg = error_of(recipe_copy.parent / "dpo.yaml", ["dpo.data.format=chat"])
    assert "dpo.data.format" in msg and "override 'dpo.data.format=chat'" in msg


@pytest.mark.parametrize(
    "override, where, message",
    [
        ("train.scheduler=cosine_wavy", "train.scheduler", "Input should be 'linear'"),
        ("export.modelfile.quant=q2_k", "export.modelfile", "quant 'q2_k' is not among the exported files"),
        ("serve.quant=q5_k_m", "serve.quant", "'q5_k_m' is not among the exported files"),
        ("serve.vllm.dtype=fp8", "serve.vllm.dtype", "Input should be 'auto'"),
        (
            "export.quality_gate={max_mean_kld: null, max_ppl_ratio: null}",
            "export.quality_gate",
            "every budget is null",
        ),
        ("bench={mode: poisson}", "bench", "mode poisson needs rate"),
    ],
)
def test_settings_that_would_fail_later_fail_when_the_recipe_loads(override, where, message):
    msg = error_of(RECIPE, [override])
    assert msg.startswith(f"override {override!r}: {where}") and message in msg, msg


def test_a_quant_named_in_the_recipe_file_is_checked_on_its_line(recipe_copy):
    recipe_copy.write_text(recipe_copy.read_text().replace("  quant: auto ", "  quant: q2_k "))
    assert error_of(recipe_copy).startswith(f"{recipe_copy}:{line_of(recipe_copy, 'quant: q2_k')}: serve.quant: ")


def test_yaml_alias_bombs_are_refused_quickly(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)
    ]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nname: x\n")
    assert "YAML aliases expand to more than" in error_of(bomb)


def test_recipe_reference_in_docs_is_generated_from_the_models():
    from pathlib import Path

    from ftx.schema_doc import reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "recipe-reference.md"
    assert doc.read_text() == reference(pipeline.Recipe, "Recipe reference"), "run: ftx recipe schema > " + str(doc)
