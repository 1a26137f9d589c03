"""Every Prometheus metric kubetune exports, in one table: the trainer and the operator register from it,
docs/metrics.md documents it, the Grafana dashboard and PrometheusRule query it, and a test checks that
all of them agree. Names follow Prometheus conventions: `kubetune_` prefix, base units, `_total` counters.

Trainer metrics carry the low-cardinality labels TRAINER_LABELS (no pod names or step numbers as labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

TRAINER_LABELS = ("namespace", "job", "stage", "adapter")


@dataclass(frozen=True)
class MetricDef:
    name: str
    type: str  # gauge | counter | histogram
    help: str
    labels: tuple[str, ...] = TRAINER_LABELS
    # Keys of the HF/TRL log dict that feed this metric (trainer side); empty for derived/operator metrics.
    log_keys: tuple[str, ...] = field(default_factory=tuple)
    component: str = "trainer"


TRAINER_METRICS: list[MetricDef] = [
    MetricDef("kubetune_train_step", "gauge", "Optimizer steps completed."),
    MetricDef("kubetune_train_total_steps", "gauge", "Optimizer steps planned for the run."),
    MetricDef("kubetune_train_epoch", "gauge", "Epochs completed (fractional).", log_keys=("epoch",)),
    MetricDef("kubetune_train_loss", "gauge", "Latest training loss.", log_keys=("loss",)),
    MetricDef("kubetune_eval_loss", "gauge", "Latest evaluation loss.", log_keys=("eval_loss",)),
    MetricDef("kubetune_eval_perplexity", "gauge", "Latest evaluation perplexity (exp of eval loss)."),
    MetricDef("kubetune_train_learning_rate", "gauge", "Current learning rate.", log_keys=("learning_rate",)),
    MetricDef("kubetune_train_grad_norm", "gauge", "Gradient norm before clipping.", log_keys=("grad_norm",)),
    MetricDef("kubetune_train_tokens_per_second", "gauge", "Training throughput in tokens per second."),
    MetricDef("kubetune_train_tokens_total", "counter", "Training tokens processed."),
    MetricDef("kubetune_train_last_progress_timestamp_seconds", "gauge", "Unix time of the last completed step."),
    MetricDef("kubetune_reward_mean", "gauge", "Mean reward of the latest RL batch.", log_keys=("reward", "rewards/mean", "objective/scores")),
    MetricDef("kubetune_reward_std", "gauge", "Standard deviation of rewards in the latest RL batch.", log_keys=("reward_std", "rewards/std")),
    MetricDef("kubetune_policy_kl", "gauge", "KL divergence of the policy from the reference model.", log_keys=("kl", "objective/kl")),
    MetricDef("kubetune_preference_reward_margin", "gauge", "Mean chosen-minus-rejected implicit reward (DPO/ORPO/KTO).", log_keys=("rewards/margins",)),
    MetricDef("kubetune_preference_reward_accuracy", "gauge", "Fraction of pairs where chosen outscores rejected.", log_keys=("rewards/accuracies", "accuracy")),
    MetricDef("kubetune_reference_perplexity", "gauge", "Perplexity on the general reference set; label when=before|after.", labels=TRAINER_LABELS + ("when",)),
    MetricDef("kubetune_forgetting_relative_change", "gauge", "Reference perplexity after/before minus 1."),
    MetricDef("kubetune_checkpoints_saved_total", "counter", "Complete checkpoints written to the output store."),
    MetricDef("kubetune_checkpoint_last_timestamp_seconds", "gauge", "Unix time of the latest complete checkpoint."),
    MetricDef("kubetune_train_nonfinite_loss_total", "counter", "Steps whose loss was NaN or infinite."),
]

OPERATOR_LABELS_JOB = ("namespace", "job")

OPERATOR_METRICS: list[MetricDef] = [
    MetricDef("kubetune_operator_jobs", "gauge", "FineTuneJobs by phase.", labels=("phase",), component="operator"),
    MetricDef("kubetune_operator_phase_transitions_total", "counter", "Phase transitions.", labels=("from_phase", "to_phase"), component="operator"),
    MetricDef("kubetune_operator_job_duration_seconds", "histogram", "Wall time from start to finish of FineTuneJobs.", labels=("stage", "result"), component="operator"),
    MetricDef("kubetune_operator_reconcile_errors_total", "counter", "Reconcile attempts that raised.", labels=("handler",), component="operator"),
    MetricDef("kubetune_job_train_loss", "gauge", "Last-known train loss of each job (kept after the pod ends).", labels=OPERATOR_LABELS_JOB, component="operator"),
    MetricDef("kubetune_job_eval_loss", "gauge", "Last-known eval loss of each job.", labels=OPERATOR_LABELS_JOB, component="operator"),
    MetricDef("kubetune_job_eval_perplexity", "gauge", "Last-known eval perplexity of each job.", labels=OPERATOR_LABELS_JOB, component="operator"),
    MetricDef("kubetune_job_progress_ratio", "gauge", "Last-known step/total of each job.", labels=OPERATOR_LABELS_JOB, component="operator"),
    MetricDef("kubetune_job_forgetting_relative_change", "gauge", "Forgetting check result of each finished job.", labels=OPERATOR_LABELS_JOB, component="operator"),
]

ALL_METRICS = TRAINER_METRICS + OPERATOR_METRICS
BY_NAME = {m.name: m for m in ALL_METRICS}
