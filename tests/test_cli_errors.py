"""Bad input through the real CLI: one line on stderr naming file/line/key, exit code 2, no traceback,
nothing written to the output directory."""

import re
import subprocess

from .conftest import FTX


def run_cli(*args):
    return subprocess.run([*FTX, *map(str, args)], capture_output=True, text=True, timeout=120)


def assert_clean_failure(proc, out_dir, pattern):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.fullmatch("error: " + pattern, lines[0]), lines[0]
    assert not out_dir.exists() or not [p for p in out_dir.rglob("*") if p.is_file()]


def test_unknown_key(recipe_copy, tmp_path):
    recipe_copy.write_text(recipe_copy.read_text().replace("  seed: 0\n\neval:", "  seed: 0\n  epochz: 3\n\neval:"))
    proc = run_cli("recipe", "run", recipe_copy, f"output_dir={tmp_path / 'out'}")
    assert_clean_failure(proc, tmp_path / "out", rf"{re.escape(str(recipe_copy))}:\d+: train\.epochz: unknown key")


def test_wrong_type(recipe_copy, tmp_path):
    recipe_copy.write_text(recipe_copy.read_text().replace("  warmup: 2\n", "  warmup: [2]\n"))
    proc = run_cli("recipe", "run", recipe_copy, f"output_dir={tmp_path / 'out'}")
    assert_clean_failure(proc, tmp_path / "out", rf"{re.escape(str(recipe_copy))}:\d+: bench\.warmup: .*integer.*")


def test_missing_dataset_file(recipe_copy, tmp_path):
    (recipe_copy.parent / "data" / "quickstart_heldout.jsonl").unlink()
    proc = run_cli("recipe", "run", recipe_copy, f"output_dir={tmp_path / 'out'}")
    assert_clean_failure(
        proc, tmp_path / "out", rf"{re.escape(str(recipe_copy))}:\d+: data\.heldout: file not found: .*"
    )


def test_malformed_jsonl_line(recipe_copy, tmp_path):
    data = recipe_copy.parent / "data" / "quickstart.jsonl"
    lines = data.read_text().splitlines()
    lines[41] = lines[41][:-5]  # cut the closing braces of line 42
    data.write_text("\n".join(lines) + "\n")
    proc = run_cli("recipe", "run", recipe_copy, f"output_dir={tmp_path / 'out'}")
    assert_clean_failure(proc, tmp_path / "out", rf"{re.escape(str(data))}:42: json: invalid JSON .*")


def test_serve_adapter_of_the_wrong_kind_for_the_engine(recipe_copy, tmp_path):
    # vLLM serves peft adapter directories: a file (here a dataset) is refused at load time, on its line
    recipe_copy.write_text(
        recipe_copy.read_text().replace("  quant: auto", "  adapters:\n    other: data/quickstart.jsonl\n  quant: auto")
    )
    proc = run_cli("recipe", "run", recipe_copy, "serve.engine=vllm", f"output_dir={tmp_path / 'out'}")
    line = next(i for i, t in enumerate(recipe_copy.read_text().splitlines(), 1) if "other:" in t)
    assert_clean_failure(
        proc,
        tmp_path / "out",
        rf"{re.escape(str(recipe_copy))}:{line}: serve\.adapters\.other: dir not found: .*quickstart\.jsonl.*",
    )


def test_bad_override(tmp_path):
    from .conftest import RECIPE

    proc = run_cli("recipe", "run", RECIPE, "train.max_steps=lots", f"output_dir={tmp_path / 'out'}")
    assert_clean_failure(proc, tmp_path / "out", r"override 'train\.max_steps=lots': train\.max_steps: .*integer.*")


def test_help_does_not_import_torch():
    proc = subprocess.run(
        [
            *FTX[:1],
            "-c",
            "import sys; from ftx.cli import cli; "
            "sys.argv=['ftx','--help']\ntry: cli()\nexcept SystemExit: pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip().endswith("False False"), proc.stdout


def test_a_latin1_dataset_names_file_line_and_the_fix(recipe_copy, tmp_path):
    data = recipe_copy.parent / "data" / "quickstart.jsonl"
    lines = data.read_text().splitlines()
    lines[9] = lines[9].replace('"content": "', '"content": "Café: ', 1)
    data.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    for cmd in (["recipe", "run", recipe_copy, f"output_dir={tmp_path / 'out'}"], ["data", "validate", data]):
        proc = run_cli(*cmd)
        assert_clean_failure(
            proc,
            tmp_path / "out",
            rf"{re.escape(str(data))}:10: not valid utf-8: byte 0xe9 at "
            r"offset \d+; save the file as UTF-8, or set data.encoding .*",
        )
    proc = run_cli("recipe", "validate", recipe_copy, "data.encoding=latin-1")  # the fix the message names
    assert proc.returncode == 0, proc.stderr


def test_an_output_dir_that_cannot_be_written_fails_before_any_work(recipe_copy, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for out in (afile / "runs", "/proc/ftx-runs"):
        proc = run_cli("recipe", "run", recipe_copy, f"output_dir={out}")
        assert_clean_failure(
            proc,
            tmp_path / "none",
            rf"override 'output_dir={re.escape(str(out))}': output_dir: "
            r"cannot write to .*",
        )
    assert afile.read_text() == "x" and not list(recipe_copy.parent.glob("runs"))


def test_paths_in_a_recipe_are_relative_to_the_recipe(recipe_copy, tmp_path):
    proc = run_cli("recipe", "validate", recipe_copy)
    assert proc.returncode == 0, proc.stderr
    import json

    cfg = json.loads(proc.stdout)
    assert cfg["output_dir"] == str((recipe_copy.parent / ".." / "runs").resolve())  # output_dir: ../runs
    assert cfg["data"]["path"] == str(recipe_copy.parent / "data" / "quickstart.jsonl")
    assert cfg["bench"]["hardware"].endswith("hardware/cloud-2vcpu.yaml")


def test_a_yaml_alias_bomb_is_refused_in_one_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        "a: &a [x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
    )
    proc = run_cli("recipe", "run", bomb, f"output_dir={tmp_path / 'out'}")
    assert_clean_failure(proc, tmp_path / "out", rf"{re.escape(str(bomb))}: YAML aliases expand to more than .*")
    proc = run_cli("serve", bomb)
    assert proc.returncode == 2 and "YAML aliases expand" in proc.stderr
