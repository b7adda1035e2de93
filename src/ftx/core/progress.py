"""Progress of a training loop (the train and DPO stages): a rich bar on a terminal, and a plain line at a fixed
cadence when the output goes to a file (CI, nohup, a job scheduler), so a long run is never silent; every
logged row is appended to metrics.jsonl; a loss that turns NaN/inf stops training."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    """step/total with a short info text: rich on a terminal, else `label step/total info ETA` lines."""

    def __init__(self, label: str, total: int, every_s: float = 30.0, stream: TextIO | None = None):
        from rich.console import Console

        self.label, self.total, self.every_s = label, total, every_s
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream)
        self.t0 = self.last = time.perf_counter()
        self.step, self.info, self.bar = 0, "", None
        if self.console.is_terminal:
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn(label),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, info="")

    def update(self, step: int | None = None, info: str | None = None) -> None:
        self.step = self.step if step is None else step
        self.info = self.info if info is None else info
        if self.bar is not None:
            self.bar.update(self.task, completed=self.step, info=self.info)
        elif time.perf_counter() - self.last >= self.every_s:
            self._line()

    def _line(self) -> None:
        self.last = time.perf_counter()
        self.printed = (self.step, self.info)
        elapsed = self.last - self.t0
        eta = elapsed / self.step * (self.total - self.step) if self.step else float("nan")
        eta_text = f"ETA {eta:.0f}s" if math.isfinite(eta) else "ETA ?"
        print(
            f"{self.label} {self.step}/{self.total} {self.info} {elapsed:.0f}s elapsed, {eta_text}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif getattr(self, "printed", None) != (self.step, self.info):  # the final state, once
            self._line()


def trainer_monitor(
    label: str,
    metrics_file: TextIO,
    row: Callable[[object, dict], dict | None],
    info_keys: tuple[str, ...],
    stopped: dict,
    quiet: bool = False,
):
    """A transformers TrainerCallback: Progress over the steps; `row(state, logs)` turns a log into the metrics row
    to append (None: nothing to write); a non-finite loss sets stopped["step"] and stops training. `quiet`: no
    progress output (the workers of a distributed run other than rank 0)."""
    import io

    from transformers import TrainerCallback

    class Monitor(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.progress = Progress(label, state.max_steps, stream=io.StringIO() if quiet else None)

        def on_step_end(self, args, state, control, **kw):
            self.progress.update(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if "loss" in logs and not math.isfinite(logs["loss"]):
                stopped["step"] = state.global_step
                control.should_training_stop = True
            out = row(state, logs)
            if out:
                metrics_file.write(json.dumps(out) + "\n")
                metrics_file.flush()
                self.progress.update(info=" ".join(f"{k}={out[k]:.4g}" for k in info_keys if out.get(k) is not None))

        def on_train_end(self, args, state, control, **kw):
            self.progress.close()

    return Monitor()
