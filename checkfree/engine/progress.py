"""
Progress
========

A tqdm progress bar for the trainer: step, loss, tokens/s, failures and recoveries so far. When a
checkpoint rollback moves the step back, the bar moves back with it.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, enabled: bool = True):
        self.bar = tqdm(
            total=total, unit="step", disable=not enabled, file=sys.stderr, dynamic_ncols=True, mininterval=0.5
        )

    def update(self, state) -> None:
        self.bar.n = state.step
        postfix = {
            "loss": f"{state.last_loss:.3f}",
            "tok/s": f"{state.tokens_per_s:,.0f}",
            "failures": state.failures,
            "recoveries": state.recoveries,
        }
        if state.last_val_loss is not None:
            postfix["val"] = f"{state.last_val_loss:.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
