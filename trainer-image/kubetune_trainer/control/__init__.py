"""Training control: decisions that stop a run, kept apart from monitoring (which only reports).
`nan_guard` fails the run at the step a loss turns NaN/inf; `early_stopping` ends it when eval loss stops
improving. RunMonitor wires both into the trainer and records what they decided."""
