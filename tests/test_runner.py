"""The runner's logic with fake stages (milliseconds, no model): cache hits, --force, --until, a failing stage leaves
nothing behind, a changed setting re-runs only what is downstream, input files are hashed by content, NOT_KEYED
settings and moved files keep the cache, undeclared reads are refused, `provides` picks the last enabled
provider, inputs are validated before anything runs, and services start only when a stage that needs them runs."""

import contextlib
import json

import pytest
from pydantic import BaseModel, ConfigDict, Field

from ftx import pipeline
from ftx.core.config import NOT_KEYED, InputFile
from ftx.core.errors import FtxError
from ftx.runner import Runner
from ftx.stage import Stage

CALLS: list[str] = []
EVENTS: list[str] = []


class Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: int = 1
    secret: str | None = Field(None, json_schema_extra=NOT_KEYED)
    src: InputFile | None = None
    fail: bool = False
    bad: bool = False


class Res(BaseModel):
    value: int
    seen: list = []


class Fake(Stage):
    config, result = Cfg, Res

    def prepare(self, ctx):
        EVENTS.append(f"prepare {self.name}")
        if ctx.cfg.bad:
            raise FtxError(f"{self.name}: bad input")

    def run(self, ctx, out):
        CALLS.append(self.name)
        if ctx.cfg.fail:
            (out / "partial.txt").write_text("half")
            raise FtxError(f"{self.name} failed")
        seen = [ctx.upstream(n).result["value"] for n in self.upstream(None)]
        (out / f"{self.name}.txt").write_text(str(ctx.cfg.value))
        return Res(value=ctx.cfg.value + sum(seen), seen=seen)


class A(Fake):
    name = "a"


class B(Fake):
    name, needs, provides, reads = "b", ("a",), "thing", ("a.value",)

    def run(self, ctx, out):
        assert ctx.setting("a.value") == ctx.upstream("a").result["value"]
        return super().run(ctx, out)


class C(Fake):
    name, needs, provides, optional = "c", ("b",), "thing", True


class D(Fake):
    name, needs = "d", ("thing",)

    @contextlib.contextmanager
    def service(self, ctx):
        EVENTS.append("service up")
        yield "endpoint"
        EVENTS.append("service down")


class E(Fake):
    name, needs = "e", ("d",)

    def run(self, ctx, out):
        assert ctx.service("d") == "endpoint"
        return super().run(ctx, out)


class Sneaky(Fake):
    name, needs = "sneaky", ("a",)

    def run(self, ctx, out):
        ctx.setting("a.value")  # not declared in `reads`


STAGES = [A(), B(), C(), D(), E()]


@pytest.fixture
def workdir(tmp_path):
    CALLS.clear()
    EVENTS.clear()
    (tmp_path / "in.txt").write_text("one")
    return tmp_path


def run(workdir, *overrides, force=(), until=None, stages=STAGES):
    recipe_file = workdir / "r.yaml"
    sections = "".join(f"{s.name}: {{}}\n" for s in stages if s.name != "a" and not s.optional)
    recipe_file.write_text("name: fake\nbase_model: none\na: {src: in.txt}\n" + sections)
    recipe = pipeline.load(recipe_file, [f"output_dir={workdir / 'out'}", *overrides], stages=stages)
    CALLS.clear()
    runner = Runner(stages, recipe, recipe.output_dir, set(force), until)
    runs = runner.run()
    return runner, {n: r for n, r in runs.items()}


def test_second_run_is_all_cached_with_the_same_keys(workdir):
    r1, runs1 = run(workdir)
    assert CALLS == ["a", "b", "d", "e"] and list(runs1) == ["a", "b", "d", "e"]
    assert runs1["d"].result["seen"] == [runs1["b"].result["value"]]  # "thing" is b while c is off
    r2, runs2 = run(workdir)
    assert CALLS == [] and all(r.cached for r in runs2.values())
    assert r1.keys == r2.keys


def test_a_changed_setting_reruns_that_stage_and_downstream_only(workdir):
    r1, _ = run(workdir)
    r2, runs = run(workdir, "b.value=5")
    assert CALLS == ["b", "d", "e"] and runs["a"].cached
    assert r2.keys["a"] == r1.keys["a"] and all(r2.keys[s] != r1.keys[s] for s in "bde")


def test_a_new_revision_reruns_that_stage_and_downstream_only(workdir, monkeypatch):
    r1, _ = run(workdir)
    monkeypatch.setattr(B, "revision", 2)  # b computes something else from the same inputs
    r2, runs = run(workdir)
    assert CALLS == ["b", "d", "e"] and runs["a"].cached
    assert r2.keys["a"] == r1.keys["a"] and all(r2.keys[s] != r1.keys[s] for s in "bde")


def test_a_read_setting_is_part_of_the_key(workdir):
    r1, _ = run(workdir)
    r2, _ = run(workdir, "a.value=3")
    assert r2.keys["b"] != r1.keys["b"]  # b declared it reads a.value (and needs a)


def test_not_keyed_settings_and_moved_inputs_keep_the_cache(workdir):
    r1, _ = run(workdir)
    (workdir / "moved").mkdir()
    (workdir / "moved" / "in.txt").write_text("one")
    r2, runs = run(workdir, "a.secret=s3cret", f"a.src={workdir / 'moved' / 'in.txt'}")
    assert CALLS == [] and r2.keys == r1.keys


def test_input_files_are_hashed_by_content(workdir):
    r1, _ = run(workdir)
    (workdir / "in.txt").write_text("two")
    r2, _ = run(workdir)
    assert CALLS == ["a", "b", "d", "e"] and r2.keys["a"] != r1.keys["a"]
    assert r2.inputs["a.src"]["sha256"] != r1.inputs["a.src"]["sha256"]


def test_force_reruns_the_stage_and_everything_after(workdir):
    run(workdir)
    _, runs = run(workdir, force=("b",))
    assert CALLS == ["b", "d", "e"] and runs["a"].cached and not runs["e"].cached
    run(workdir, force=("all",))
    assert CALLS == ["a", "b", "d", "e"]


def test_until_stops_early(workdir):
    _, runs = run(workdir, until="b")
    assert CALLS == ["a", "b"] and list(runs) == ["a", "b"]


def test_unknown_stage_is_refused(workdir):
    with pytest.raises(FtxError, match="unknown stage 'nope'"):
        run(workdir, until="nope")


def test_a_failing_stage_leaves_nothing_and_keeps_what_finished(workdir):
    with pytest.raises(FtxError, match="d failed"):
        run(workdir, "d.fail=true")
    cache = workdir / "out" / ".cache"
    assert not (cache / "d").exists() or not list((cache / "d").iterdir())  # no result, no temp dir
    assert [p.name for p in cache.iterdir()] and (cache / "b").exists()
    _, runs = run(workdir)
    assert CALLS == ["d", "e"] and runs["a"].cached and runs["b"].cached


def test_inputs_are_validated_before_any_stage_runs(workdir):
    with pytest.raises(FtxError, match="e: bad input"):
        run(workdir, "e.bad=true")
    assert CALLS == [] and not (workdir / "out" / ".cache").exists()
    assert EVENTS == ["prepare a", "prepare b", "prepare d", "prepare e"]


def test_provides_resolves_to_the_last_enabled_provider(workdir):
    _, runs = run(workdir, "c={value: 10}")
    assert CALLS == ["a", "b", "c", "d", "e"]
    assert runs["d"].result["seen"] == [runs["c"].result["value"]]


def test_services_start_only_when_a_stage_needing_them_runs(workdir):
    run(workdir)
    assert EVENTS.count("service up") == 1 and EVENTS[-1] == "service down"
    EVENTS.clear()
    run(workdir)
    assert "service up" not in EVENTS  # everything cached: no endpoint started
    run(workdir, "e.value=7")
    assert EVENTS.count("service up") == 1 and CALLS == ["e"]  # d cached, e needs its live service


def test_undeclared_reads_are_refused(workdir):
    with pytest.raises(RuntimeError, match="without declaring it in `reads`"):
        run(workdir, stages=[A(), Sneaky()])


def test_stage_json_records_the_result(workdir):
    runner, runs = run(workdir)
    stage_json = json.loads((workdir / "out" / ".cache" / "b" / runner.keys["b"] / "stage.json").read_text())
    assert stage_json["result"] == runs["b"].result and stage_json["key"] == runner.keys["b"]
