"""The TrainerCallback that feeds a RunMonitor. Kept apart from monitor.py because subclassing TrainerCallback
imports transformers (5-7 s), which `kubetune --help`, the operator-side tests and the dashboard tools must not pay.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback


class MonitorCallback(TrainerCallback):
    def __init__(self, monitor):
        self.monitor = monitor

    def on_train_begin(self, args, state, control, **kwargs):
        self.monitor._on_train_begin(state)

    def on_step_end(self, args, state, control, **kwargs):
        # The hot path: attribute writes only. Gauges read _step/_last_progress when Prometheus scrapes.
        m = self.monitor
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        if not m._paused:  # an interval holding an evaluation or a checkpoint save is not throughput
            m._win_time += now - m._t_prev
            m._win_tokens += tokens - m._tok_prev
        m._paused = False
        m._t_prev = now
        m._tok_prev = tokens
        m._step = state.global_step
        m._last_progress = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.monitor._on_log(state, logs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.monitor._on_evaluate(state, control, metrics)

    def on_save(self, args, state, control, **kwargs):
        self.monitor._paused = True

    def on_train_end(self, args, state, control, **kwargs):
        self.monitor._on_train_end(state)
