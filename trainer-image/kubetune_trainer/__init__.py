"""kubetune's trainer: runs a FineTuneJob in the pods (`python -m kubetune_trainer`) and locally (`kubetune run`).
Map: docs/trainer-architecture.md."""
