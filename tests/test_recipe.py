"""Recipe validation, overrides and cache keys (pure logic, no model)."""

import re

import pytest

from ftx import recipe as R
from ftx.errors import FtxError

from .conftest import RECIPE


def error_of(path, overrides=()):
    with pytest.raises(FtxError) as e:
        R.load(path, overrides)
    return str(e.value)


def line_of(path, needle):
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_quickstart_recipe_is_valid_and_paths_resolve():
    r = R.load(RECIPE)
    assert r.name == "quickstart"
    assert r.data.path.is_absolute() and r.data.path.is_file()
    assert r.train.method == "lora" and r.export.quants == ["q8_0", "q6_k", "q4_k_m"]
    assert r.export.quality_gate.max_mean_kld == 0.05 and r.serve.quant == "auto"


def test_overrides_parse_types_and_nested_keys():
    r = R.load(RECIPE, ["train.max_steps=7", "train.learning_rate=5e-4", "train.lora.r=4", "bench.concurrency=2",
                        "serve.host=0.0.0.0"])
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
    assert "unknown quant" in error_of(RECIPE, ["export.quants=[q3_xyz]"])


def test_invalid_yaml_has_line(recipe_copy):
    recipe_copy.write_text("name: x\ndata: [unclosed\n")
    assert re.match(rf"{re.escape(str(recipe_copy))}:\d+: invalid YAML", error_of(recipe_copy))


def test_cache_keys_are_stable_and_sensitive(tmp_path):
    runner = R.Runner(tmp_path, set(), console=None)
    a = runner.key("train", {"lr": 1e-3, "steps": 10}, ["d1", "b1"])
    assert a == runner.key("train", {"steps": 10, "lr": 1e-3}, ["d1", "b1"])  # key order does not matter
    assert a != runner.key("train", {"lr": 2e-3, "steps": 10}, ["d1", "b1"])  # config change
    assert a != runner.key("train", {"lr": 1e-3, "steps": 10}, ["d2", "b1"])  # upstream change
    assert a != runner.key("merge", {"lr": 1e-3, "steps": 10}, ["d1", "b1"])  # stage name


def test_downstream_key_changes_when_upstream_changes(tmp_path):
    runner = R.Runner(tmp_path, set(), console=None)
    t1 = runner.key("train", {"lr": 1e-3}, ["data"])
    t2 = runner.key("train", {"lr": 5e-4}, ["data"])
    assert runner.key("merge", {}, [t1]) != runner.key("merge", {}, [t2])
    assert runner.key("data", {"seed": 0}, []) == runner.key("data", {"seed": 0}, [])


def test_forcing_a_stage_forces_downstream():
    assert R.forced_stages(()) == set()
    assert R.forced_stages(("merge",)) == {"merge", "export", "serve", "bench"}
    assert R.forced_stages(("all",)) == set(R.STAGES)


def test_api_key_is_redacted_from_manifest_config():
    r = R.load(RECIPE, ["serve.api_key=s3cret"])
    assert R.redacted(r)["serve"]["api_key"] == "***"


@pytest.mark.parametrize("path", sorted((RECIPE.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    r = R.load(path)
    assert r.data.path.is_file()
    if r.dpo:
        assert r.dpo.data.path.is_file() and r.dpo.data.format == "preference"


def test_gpu_recipe_is_planned_to_fit_a_24gb_card():
    from ftx.plan import PlanConfig, plan, recipe_plan_config

    cfg = recipe_plan_config(R.load(RECIPE.parent / "llama3.1-8b-qlora.yaml"), "cuda")
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
