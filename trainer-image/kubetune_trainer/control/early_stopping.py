"""Early stopping (spec.evaluation.earlyStopping): count evaluations whose loss did not improve by more than
minDelta on the best so far; once `patience` of them in a row, the run should stop. Pure bookkeeping, so
every rank decides the same from the same eval losses (ranks that disagreed would deadlock in the next
collective) and a resumed run rebuilds the count from the restored log history."""

from __future__ import annotations

from typing import Optional


class EarlyStopping:
    def __init__(self, patience: Optional[int], min_delta: float = 0.0):
        self.patience = patience  # None: disabled
        self.min_delta = min_delta
        self.best: Optional[float] = None
        self.bad_evals = 0

    @classmethod
    def from_spec(cls, spec) -> "EarlyStopping":
        es = spec.evaluation.early_stopping if spec.evaluation else None
        return cls(es.patience if es else None, es.min_delta if es else 0.0)

    def update(self, loss: float) -> bool:
        """Count one evaluation; True once patience is used up."""
        if self.patience is None:
            return False
        if self.best is None or loss < self.best - self.min_delta:
            self.best, self.bad_evals = loss, 0
        else:
            self.bad_evals += 1
        return self.bad_evals >= self.patience

    def message(self, step: int) -> str:
        return (f"stopped early at step {step}: eval loss did not improve by more than {self.min_delta:g} for "
                f"{self.patience} evaluations (best {self.best:.4f})")
