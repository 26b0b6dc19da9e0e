"""Early stopping on eval loss (train.early_stopping): the best step so far, and when to stop."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class EarlyStopping:
    """`update(step, eval_loss)` after each evaluation: True when it is a new best (lower than the best so far
    by more than min_delta); `stop` once `patience` evaluations in a row were not. `state()` goes into each
    checkpoint and `restore` reads it back, so a resumed run counts on where it left off."""

    patience: int
    min_delta: float = 0.0
    best_loss: float = math.inf
    best_step: int | None = None
    bad: int = 0  # evaluations since the best

    def update(self, step: int, eval_loss: float) -> bool:
        if eval_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.bad = eval_loss, step, 0
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad >= self.patience

    def state(self) -> dict:
        return {"early_stopping": {"best_loss": None if math.isinf(self.best_loss) else self.best_loss,
                                   "best_step": self.best_step, "bad": self.bad}}

    def restore(self, state: dict) -> None:
        saved = state.get("early_stopping") or {}
        self.best_loss = math.inf if saved.get("best_loss") is None else saved["best_loss"]
        self.best_step, self.bad = saved.get("best_step"), saved.get("bad", 0)

    def summary(self, stopped_at: int | None) -> dict:
        return {"best_step": self.best_step, "best_eval_loss": None if math.isinf(self.best_loss) else self.best_loss,
                "stopped_early_at": stopped_at, "patience": self.patience, "min_delta": self.min_delta}
