"""Every Prometheus metric kubetune exports, in one table: the trainer and the operator register from it,
docs/metrics.md documents it, the Grafana dashboard and the alerting rules query it, and
tests/unit/test_metrics_catalog.py checks that all of them agree.

Conventions (checked by that test): `kubetune_` prefix; base units (`_seconds`, `_bytes`, `_ratio`); `_total`
on counters and only on counters; label names that do not collide with the labels Prometheus itself attaches.

The FineTuneJob's name is the label `finetunejob`, not `job`: Prometheus sets `job` (and `instance`) on every
scraped series from the scrape config, so an exported `job` label is renamed to `exported_job` under the
default `honor_labels: false` (and with `honorLabels: true` it would overwrite the scrape job instead). The
trainer's `namespace` equals the pod's namespace, so the `namespace` target label that pod discovery adds
agrees with it; the operator describes jobs in other namespaces and is scraped with `honorLabels: true`, as
kube-state-metrics is.

Trainer metrics carry the low-cardinality labels TRAINER_LABELS (no pod names or step numbers as labels).

To refresh the table in docs/metrics.md after changing this file:

    .venv/bin/python -c "from kubetune_api.metrics_catalog import markdown_table; print(markdown_table())"
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The label carrying the FineTuneJob's name (see the module docstring for why it is not `job`).
JOB_LABEL = "finetunejob"
TRAINER_LABELS = ("namespace", JOB_LABEL, "stage", "adapter")


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
    MetricDef("kubetune_eval_perplexity", "gauge",
              "Latest evaluation perplexity, token-weighted (exp of total NLL / tokens); stages cpt and sft only."),
    MetricDef("kubetune_train_learning_rate", "gauge", "Current learning rate.", log_keys=("learning_rate",)),
    MetricDef("kubetune_train_grad_norm", "gauge", "Gradient norm before clipping.", log_keys=("grad_norm",)),
    MetricDef("kubetune_train_tokens_per_second", "gauge",
              "Training throughput in input tokens per second (all processes; evaluation and checkpoint pauses "
              "excluded)."),
    MetricDef("kubetune_train_tokens_total", "counter", "Training input tokens processed (all processes)."),
    MetricDef("kubetune_train_last_progress_timestamp_seconds", "gauge",
              "Unix time of the last completed optimizer step (training start before the first one)."),
    MetricDef("kubetune_train_eta_seconds", "gauge",
              "Estimated seconds until the planned steps are done, from the recent step rate."),
    MetricDef("kubetune_reward_mean", "gauge", "Mean reward of the latest RL batch.",
              log_keys=("reward", "rewards/mean", "objective/scores")),
    MetricDef("kubetune_reward_std", "gauge", "Standard deviation of rewards in the latest RL batch.",
              log_keys=("reward_std", "rewards/std")),
    MetricDef("kubetune_reward_errors_total", "counter",
              "Reward-function calls that failed (raised, or timed out/crashed in the sandbox after retries); their "
              "scores were dropped for that step. Label reward = the function's name in TRL's logs.",
              labels=TRAINER_LABELS + ("reward",)),
    MetricDef("kubetune_policy_kl", "gauge", "KL divergence of the policy from the reference model.",
              log_keys=("kl", "objective/kl")),
    MetricDef("kubetune_preference_reward_margin", "gauge",
              "Mean chosen-minus-rejected reward (DPO/ORPO/KTO implicit reward; reward-model score margin).",
              log_keys=("rewards/margins", "margin")),
    MetricDef("kubetune_preference_reward_accuracy", "gauge", "Fraction of pairs where chosen outscores rejected.",
              log_keys=("rewards/accuracies", "accuracy")),
    MetricDef("kubetune_eval_reward_accuracy", "gauge",
              "Latest evaluation reward accuracy: dpo/orpo pairs whose chosen answer gets the higher implicit reward; "
              "reward models' pairwise accuracy.", log_keys=("eval_rewards/accuracies", "eval_accuracy")),
    MetricDef("kubetune_eval_reward_margin", "gauge",
              "Latest evaluation chosen-minus-rejected reward (dpo/orpo/kto implicit reward; reward-model score).",
              log_keys=("eval_rewards/margins", "eval_margin")),
    MetricDef("kubetune_reference_perplexity", "gauge",
              "Perplexity on the general reference set; label when=before|after.", labels=TRAINER_LABELS + ("when",)),
    MetricDef("kubetune_forgetting_relative_change", "gauge", "Reference perplexity after/before minus 1."),
    MetricDef("kubetune_checkpoints_saved_total", "counter", "Complete checkpoints written to the output store."),
    MetricDef("kubetune_checkpoint_last_timestamp_seconds", "gauge", "Unix time of the latest complete checkpoint."),
    MetricDef("kubetune_train_nonfinite_loss_total", "counter", "Steps whose loss was NaN or infinite."),
]

OPERATOR_LABELS_JOB = ("namespace", JOB_LABEL)

OPERATOR_METRICS: list[MetricDef] = [
    MetricDef("kubetune_operator_jobs", "gauge", "FineTuneJobs by phase.", labels=("phase",), component="operator"),
    MetricDef("kubetune_operator_phase_transitions_total", "counter", "Phase transitions.",
              labels=("from_phase", "to_phase"), component="operator"),
    MetricDef("kubetune_operator_job_duration_seconds", "histogram", "Wall time from start to finish of FineTuneJobs.",
              labels=("stage", "result"), component="operator"),
    MetricDef("kubetune_operator_reconcile_errors_total", "counter", "Reconcile attempts that raised.",
              labels=("handler",), component="operator"),
    MetricDef("kubetune_operator_reconciles_total", "counter",
              "FineTuneJob reconciles run, by trigger: event (a watch event of the job or its Job/pods), waiting (a "
              "Pending job whose pods Kubernetes refuses to create, looked at every progress interval), resync (none "
              "for KUBETUNE_RESYNC_INTERVAL_SECONDS).", labels=("trigger",), component="operator"),
    MetricDef("kubetune_operator_progress_scrapes_total", "counter",
              "Scrapes of Running jobs' /progress, by result (ok, failed).", labels=("result",), component="operator"),
    MetricDef("kubetune_operator_gc_seconds_total", "counter",
              "CPU seconds the operator's Python garbage collector took, by generation (2: full collections); "
              "KUBETUNE_GC_THRESHOLD sets how often it runs.", labels=("generation",), component="operator"),
    MetricDef("kubetune_job_phase", "gauge",
              "1 for each job's current phase, 0 for the other phases (series removed when the job is deleted).",
              labels=OPERATOR_LABELS_JOB + ("phase",), component="operator"),
    MetricDef("kubetune_job_train_loss", "gauge", "Last-known train loss of each job (kept after the pod ends).",
              labels=OPERATOR_LABELS_JOB, component="operator"),
    MetricDef("kubetune_job_eval_loss", "gauge", "Last-known eval loss of each job.", labels=OPERATOR_LABELS_JOB,
              component="operator"),
    MetricDef("kubetune_job_eval_perplexity", "gauge", "Last-known eval perplexity of each cpt/sft job.",
              labels=OPERATOR_LABELS_JOB, component="operator"),
    MetricDef("kubetune_job_reward_accuracy", "gauge",
              "Last-known reward accuracy of each dpo/orpo/reward job (status.progress.rewardAccuracy).",
              labels=OPERATOR_LABELS_JOB, component="operator"),
    MetricDef("kubetune_job_reward_margin", "gauge",
              "Last-known chosen-minus-rejected reward margin of each dpo/orpo/kto/reward job.",
              labels=OPERATOR_LABELS_JOB, component="operator"),
    MetricDef("kubetune_job_mean_reward", "gauge", "Last-known mean rollout reward of each grpo/rloo/ppo job.",
              labels=OPERATOR_LABELS_JOB, component="operator"),
    MetricDef("kubetune_job_policy_kl", "gauge", "Last-known policy KL from the reference of each grpo/rloo/ppo job.",
              labels=OPERATOR_LABELS_JOB, component="operator"),
    MetricDef("kubetune_job_progress_ratio", "gauge", "Last-known step/total of each job.", labels=OPERATOR_LABELS_JOB,
              component="operator"),
    MetricDef("kubetune_job_forgetting_relative_change", "gauge", "Forgetting check result of each finished job.",
              labels=OPERATOR_LABELS_JOB, component="operator"),
    MetricDef("kubetune_job_gpu_seconds_total", "counter",
              "GPU-seconds each job has held: GPUs x run time of every trainer pod, summed over all attempts "
              "(queued and suspended time excluded); mirrors status.gpuSeconds, so it continues across operator "
              "restarts. Label queue = the Kueue LocalQueue (empty without one). For charge-back: "
              "sum by (namespace) (increase(kubetune_job_gpu_seconds_total[30d])).",
              labels=OPERATOR_LABELS_JOB + ("queue",), component="operator"),
    MetricDef("kubetune_job_forgetting_threshold", "gauge",
              "spec.evaluation.forgettingThreshold of each job that has a reference set.",
              labels=OPERATOR_LABELS_JOB, component="operator"),
    MetricDef("kubetune_operator_pipeline_phase", "gauge",
              "1 for each FineTunePipeline's current phase, 0 for the others (removed when the pipeline is deleted).",
              labels=("namespace", "pipeline", "phase"), component="operator"),
    MetricDef("kubetune_operator_pipeline_current_stage", "gauge", "Number (1-based) of each pipeline's current stage.",
              labels=("namespace", "pipeline"), component="operator"),
    MetricDef("kubetune_operator_pipeline_stage", "gauge",
              "Stage number of each started stage's FineTuneJob: join kubetune_job_* series on (namespace, "
              "finetunejob) to give them the pipeline and stage labels.",
              labels=("namespace", "pipeline", "stage", JOB_LABEL), component="operator"),
]

ALL_METRICS = TRAINER_METRICS + OPERATOR_METRICS
BY_NAME = {m.name: m for m in ALL_METRICS}


def markdown_table() -> str:
    """The metric table of docs/metrics.md, generated from this catalog (the test compares both ways)."""
    rows = ["| name | type | labels | component | help |", "|---|---|---|---|---|"]
    for m in ALL_METRICS:
        labels = ", ".join(f"`{label}`" for label in m.labels)
        help_text = m.help.replace("|", "\\|")  # a literal pipe would split the cell
        rows.append(f"| `{m.name}` | {m.type} | {labels} | {m.component} | {help_text} |")
    return "\n".join(rows)
