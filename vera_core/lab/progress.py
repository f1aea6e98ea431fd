"""Progress bars fed by the trainer's events: one tqdm bar per run with its loss, eval loss and ETA."""
from __future__ import annotations

import sys
from typing import Callable


def with_bar(progress: bool | None, on_event: Callable[[dict], None] | None) -> Callable[[dict], None] | None:
    """`on_event`, with a ProgressBar listening too when `progress` asks for one. progress=None: a bar when nobody
    else listens to the events and a person watches the output (a terminal or a notebook)."""
    if progress is None:
        progress = on_event is None and ("ipykernel" in sys.modules or sys.stderr.isatty())
    if not progress:
        return on_event
    bar = ProgressBar()
    if on_event is None:
        return bar

    def both(event: dict) -> None:
        bar(event)
        on_event(event)

    return both


class ProgressBar:
    """An `on_event` listener: a bar opens at a run's "start" event and closes at its "done", "stopped" or "error"."""

    def __init__(self):
        self.bar = None
        self.postfix: dict[str, str] = {}

    def __call__(self, event: dict) -> None:
        from tqdm.auto import tqdm  # a widget in notebooks, text in terminals

        kind = event["type"]
        if kind == "start":
            self.postfix = {}
            self.bar = tqdm(total=event["total"], initial=event.get("step", 0), desc=event["run"], unit="step", leave=True)
        elif self.bar is None:
            return
        elif kind == "step":
            self.bar.update(event["step"] - self.bar.n)
            self.postfix["loss"] = f"{event['loss']:.3f}"
            self.bar.set_postfix(self.postfix)
        elif kind == "eval":
            self.postfix["eval_loss"] = f"{event['eval_loss']:.3f}"
            self.bar.set_postfix(self.postfix)
        elif kind in ("done", "stopped", "error"):
            self.bar.close()
            self.bar = None
