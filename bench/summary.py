"""One table of every benchmark result in bench/results/ (the common schema of bench/harness.py): headline ratio,
target, met, spread and whether the spread makes the verdict noisy. `make bench` prints it after running them.

    .venv/bin/python bench/summary.py
"""

import json

import harness


def main() -> None:
    rows = []
    for f in sorted(harness.RESULTS.glob("*.json")):
        r = json.loads(f.read_text())
        s = r.get("spread") or {}
        rows.append(
            [
                r.get("name", f.stem),
                f"{r['ratio']:.3f}",
                str(r.get("target")),
                harness._yes(r.get("met")),
                f"{s['min']:.3f}-{s['max']:.3f}" if s else "",
                harness._yes(r.get("noisy")),
                str(len(r.get("rounds") or [])),
                str(r.get("measured_at", "")),
            ]
        )
    if not rows:
        raise SystemExit(f"no results in {harness.RESULTS}: run the scripts in bench/ (make bench)")
    harness.table(
        "benchmarks (bench/results/*.json)",
        ["name", "ratio", "target", "met", "spread", "noisy", "rounds", "measured"],
        rows,
    )


if __name__ == "__main__":
    main()
