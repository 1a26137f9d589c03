"""What every stage gets and must return.

A stage turns a prepared `StageContext` into a `transformers.Trainer` (TRL's trainers are subclasses; a stage
with no TRL trainer, like PPO, subclasses Trainer itself). Returning a Trainer is what lets one runner give
every stage the same checkpointing, resume, SIGTERM handling, metrics, NaN guard and early stopping through
TrainerCallbacks, instead of each stage re-implementing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from kubetune_api.finetunejob import FineTuneJob, FineTuneJobSpec


@dataclass
class StageContext:
    job: FineTuneJob
    # Base model as loaded (4-bit for qlora, full precision otherwise), NOT wrapped in PEFT: TRL trainers
    # wrap it themselves from `peft_config`, which also gives DPO a free reference model (adapter disabled).
    # With spec.model.adapter it is already a trainable PeftModel holding that adapter (and peft_config is None);
    # the API refuses that for stages whose reference would be the adapter-disabled base (rules.base_reference).
    model: Any
    tokenizer: Any
    # None for adapter types full and galore, and when the model already carries its (start) adapter.
    peft_config: Optional[Any]
    # Datasets already in the column layout TRL expects for the spec's dataset format
    # (text | messages | prompt/completion | prompt/chosen/rejected | prompt/completion/label | prompt+extras).
    train_dataset: Any
    eval_dataset: Optional[Any]
    # Keyword arguments common to every TrainingArguments subclass (output_dir, lr, steps, batch size,
    # precision, logging/eval/save cadence, seed, optim for galore, deepspeed config, report_to=[] ...).
    # A stage passes them to its TRL config: `DPOConfig(**ctx.training_args, beta=...)`.
    training_args: dict
    callbacks: list = field(default_factory=list)
    work_dir: Path = Path(".")
    # Loads another model from a URI (reward model, PPO value model init): uri, kind ("causal"|"reward").
    load_model: Optional[Callable[..., Any]] = None
    # Resolves a URI to a local path (downloads s3:// to the cache): custom reward modules use it.
    fetch: Optional[Callable[[str], Path]] = None

    @property
    def spec(self) -> FineTuneJobSpec:
        return self.job.spec

    def trainer_kwargs(self) -> dict:
        """The arguments every TRL trainer takes the same way: `DPOTrainer(model=..., args=..., **ctx.trainer_kwargs())`."""
        return {
            "train_dataset": self.train_dataset,
            "eval_dataset": self.eval_dataset,
            "processing_class": self.tokenizer,
            "peft_config": self.peft_config,
            "callbacks": list(self.callbacks),
        }


class Stage:
    """Subclass per stage module; register with @register."""

    name: ClassVar[str]
    # The model head this stage trains: "causal" (AutoModelForCausalLM) or "reward"
    # (AutoModelForSequenceClassification with one label).
    model_kind: ClassVar[str] = "causal"

    def build_trainer(self, ctx: StageContext):  # -> transformers.Trainer
        raise NotImplementedError  # abstract: every registered stage overrides it

    def validate_dataset(self, ctx: StageContext) -> None:
        """Optional stage-specific checks beyond the format's required columns (raise DataError)."""
