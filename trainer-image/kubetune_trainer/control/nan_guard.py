"""The NaN guard: check every optimizer step's loss as it is computed and fail the run at the first NaN/inf,
before the optimizer applies the bad gradients (errors.DivergedError, which is not retried).

    install_nan_guard(trainer, on_nonfinite)   # on_nonfinite(step, value) records it, then raises
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from ..errors import DivergedError


def install_nan_guard(trainer, on_nonfinite: Callable[[int, float], None]) -> None:
    """Wrap this trainer instance's `training_step`; call `on_nonfinite(step, value)` for a NaN/inf loss.

    Micro-batch losses are summed on the device (NaN and inf propagate through a sum) and read back once per
    optimizer step, when gradients sync: one host sync per step, the same HF's default NaN filter costs.
    Installing twice is a no-op.
    """
    import torch

    original = trainer.training_step
    if getattr(original, "_kubetune_guarded", False):
        return
    accumulation = max(1, int(getattr(getattr(trainer, "args", None), "gradient_accumulation_steps", 1) or 1))
    accelerator = getattr(trainer, "accelerator", None)
    pending: list = [None]

    def training_step(*args, **kwargs):
        loss = original(*args, **kwargs)
        if not isinstance(loss, torch.Tensor):
            return loss
        if accumulation == 1:
            # Every call is a whole optimizer step: read the loss right away, without accelerate's
            # sync_gradients property (several microseconds per call, measured in bench/).
            value = loss.item() if loss.numel() == 1 else float(loss.detach().sum())
            if not math.isfinite(value):
                on_nonfinite(trainer.state.global_step + 1, value)
            return loss
        part = loss.detach() if loss.requires_grad else loss
        if part.numel() != 1:
            part = part.sum()
        pending[0] = part if pending[0] is None else pending[0] + part
        if accelerator is None or accelerator.sync_gradients:  # the last micro-batch of the step
            total = pending[0].item()
            pending[0] = None
            if not math.isfinite(total):
                on_nonfinite(trainer.state.global_step + 1, total)
        return loss

    training_step._kubetune_guarded = True  # type: ignore[attr-defined]
    trainer.training_step = training_step


def diverged_error(step: int, value: float, last_loss: Optional[float]) -> DivergedError:
    """The error a NaN/inf loss fails the run with: what happened, at which step, and the fixes."""
    last = f"; last logged loss {last_loss:.4g}" if last_loss is not None else ""
    kind = "NaN" if math.isnan(value) else "infinite"
    err = DivergedError(
        f"training loss became {kind} at step {step}{last}. Lower spec.training.learningRate, keep "
        f"spec.training.maxGradNorm > 0, or use precision bf16 instead of fp16; resuming the same config "
        f"would diverge again")
    err.step = step  # type: ignore[attr-defined]
    return err
