"""End to end, as a newcomer would: an alpaca CSV of one's own (saved by a spreadsheet: a byte order mark, Latin-1
text, the encoding declared in the recipe), a minimal recipe written from the README, a bundle to ship, and the
bundle copied elsewhere and served on its own."""

import csv
import hashlib
import io
import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from .conftest import FTX
from .test_e2e_serve import free_port, wait_healthy

pytestmark = pytest.mark.e2e
WORDS = [
    "café",
    "crème",
    "über",
    "naïve",
    "façade",
    "déjà",
    "señor",
    "jalapeño",
    "résumé",
    "fiancé",
    "piñata",
    "soupçon",
    "entrée",
    "doppelgänger",
    "smörgåsbord",
    "Zürich",
]


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["instruction", "input", "output"])
    for word, i in rows:
        w.writerow(["Write this word in capitals.", f"{word} {i}", f"{word.upper()} {i}"])
    path.write_bytes(b"\xef\xbb\xbf" + buf.getvalue().encode("latin-1"))


RECIPE = """name: capitals
base_model: smollm2-135m-instruct
data:
  path: mine.csv
  heldout: mine_heldout.csv
  encoding: latin-1
  max_seq_len: 128
train: {max_steps: 2, eval_every: 2, batch_size: 4}
eval: {max_prompts: 4, max_new_tokens: 16, forgetting: {prompts: 8, max_new_tokens: 32}, judge: {max_tokens: 16}}
export:
  gguf: {quants: [q8_0]}
  eval_tokens: 512
serve: {check_prompts: 2}
bench: {sweep: [1], requests: 2, warmup: 0, max_tokens: 8}
output_dir: runs
bundle: ship
"""


def test_own_latin1_csv_to_bundle_to_served(tmp_path):
    import openai

    _write_csv(tmp_path / "mine.csv", [(w, i) for i in range(5) for w in WORDS])
    _write_csv(tmp_path / "mine_heldout.csv", [(w, 100 + i) for i, w in enumerate(WORDS[:4])])
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    proc = subprocess.run(
        [*FTX, "recipe", "run", "recipe.yaml"], capture_output=True, text=True, timeout=1800, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1]).parent
    assert run_dir.parent.parent == tmp_path / "runs"  # output_dir relative to the recipe
    card = json.loads((run_dir / "run_card.json").read_text())
    assert card["data"]["load"][0]["format"] == "alpaca" and card["data"]["heldout_rows"] == 4
    samples = json.dumps(card["eval"]["samples"], ensure_ascii=False)
    assert "café 100" in samples and "CAFÉ 100" in samples and "über 102" in samples  # Latin-1 text read as text
    # the judge (the base model's own GGUF on llama-server) on every held-out pair, in both orders: a 135M judge
    # does not follow the judge prompt, so its checks fail and the card names no winner
    j = card["eval"]["judge"]
    assert j["pairs"] == 4 and j["models"] == ["base", "fine-tuned"]
    assert not j["reliable"] and j["verdict"] is None and "no winner" in j["text"].lower(), j["text"]
    verdicts = [json.loads(line) for line in (run_dir / "stages" / "eval" / "judge.jsonl").open()]
    assert len(verdicts) == 4 + 4 and all(len(v["orders"]) == 2 for v in verdicts)  # + the identical pairs
    assert [v["orders"][0]["a"] for v in verdicts] == ["model_1"] * 8
    assert [v["orders"][1]["a"] for v in verdicts] == ["model_2"] * 8
    assert all(o["output"] or o["error"] for v in verdicts for o in v["orders"])  # the judge really answered
    assert "### Judge: fine-tuned vs base" in (md := (run_dir / "run_card.md").read_text()) and "NOT RELIABLE" in md
    # the bundle: real files, the proven Modelfile, the run card that names it, the license, checksums that verify
    ship = tmp_path / "ship"
    assert card["bundle"]["dir"] == str(ship)
    names = sorted(p.name for p in ship.iterdir())
    assert names == sorted(
        [
            "model-q8_0.gguf",
            "Modelfile",
            "Modelfile.proof.json",
            "run_card.md",
            "run_card.json",
            "README.md",
            "LICENSE",
            "SHA256SUMS",
        ]
    ), names
    assert not any(p.is_symlink() for p in ship.iterdir())
    for line in (ship / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((ship / name).read_bytes()).hexdigest() == digest, name
    assert "Apache License" in (ship / "LICENSE").read_text() and "## Bundle" in (ship / "run_card.md").read_text()
    modelfile = (ship / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in modelfile and "PARAMETER num_ctx 8192" in modelfile  # the model's context
    assert "num_ctx 8192 (the model's context length)" in (run_dir / "run_card.md").read_text()
    # copied elsewhere, the bundle alone serves, named from the GGUF's metadata
    elsewhere = tmp_path / "device"
    shutil.copytree(ship, elsewhere)
    port = free_port()
    server = subprocess.Popen(
        [
            *FTX,
            "serve",
            "--gguf",
            str(elsewhere / "model-q8_0.gguf"),
            "--port",
            str(port),
            "--api-key",
            "k",
            "--log",
            str(tmp_path / "s.log"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_healthy(port, server)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["capitals"]
        r = client.chat.completions.create(
            model="capitals", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
        )
        assert r.choices[0].message.content is not None
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
