"""Proximal Policy Optimization (ppo) against a sequence-classification reward model, as a `transformers.Trainer`.

    spec:
      stage: ppo
      dataset: {format: prompt_only, train: [{uri: s3://data/prompts.jsonl}]}
      training:
        batchSize: 8                      # prompts per device per rollout (one completion each)
        ppo:
          rewardModel: s3://out/ml/my-rm/adapter  # a reward job's output: adapter/ (LoRA or full) or merged/
          maxCompletionLength: 32
          temperature: 1.0
          ppoEpochs: 2                    # optimizer steps on each rollout batch
          clipRange: 0.2                  # policy ratio clipping
          valueClipRange: 0.2
          klCoef: 0.05                    # per-token KL penalty to the reference policy, inside the reward
          vfCoef: 0.5
          gamma: 1.0
          lam: 0.95

Why our own trainer: TRL removed PPO (moved to `trl.experimental.ppo` in v1.10, deleted with its value-head
models in huggingface/trl#7020), and the libraries that still run PPO pin old TRL releases (that PR lists
ms-swift on trl<1.0 and verl on trl<=0.9.6), which cannot be installed next to our trl 1.16 pin; the larger
RLHF systems bring their own launchers (Ray, vLLM) rather than a `transformers.Trainer` a pod can run. A
`Trainer` subclass keeps everything the runner gives every stage: checkpoints with optimizer/scheduler/RNG
state and resume, SIGTERM saves, metrics callbacks, the NaN guard (it wraps `training_step`, which returns
the PPO loss here), early stopping and artifacts.

The algorithm (the standard RLHF PPO of Ouyang et al. / Huang et al. "The N+ implementation details of RLHF"):

1. Rollout: sample one completion per prompt from the policy (temperature, no top-k/top-p), masked after the
   first EOS. Per-token log-probs under the policy (logits / temperature: the sampling distribution) and under
   the reference, and values from the value head, are computed with no gradient.
2. Reward: the reward model scores `prompt + completion (+ EOS)` exactly as RewardTrainer trained it
   (rewards.RewardModelScorer). Per-token reward = -klCoef * (logp - ref_logp), plus the score on the last
   completion token. The reference is the adapter-disabled base for LoRA/QLoRA/DoRA (no second copy of the
   weights) and a frozen copy of the starting weights for full/GaLore.
3. GAE(gamma, lam) over the completion tokens -> advantages (whitened per batch) and returns.
4. `ppoEpochs` optimizer steps on that batch: clipped policy loss (clipRange) + vfCoef x clipped value loss
   (valueClipRange). Each rollout batch is served `ppoEpochs` times in a row by the sampler, so one Trainer
   optimizer step is one PPO update and `maxSteps`, the LR schedule, checkpoint cadence and gradient
   accumulation all keep their usual meaning; `epochs` counts passes over the prompts.

The value head is a linear layer (hidden size -> 1, zero-initialised) on the policy's last hidden state,
*detached*: the value loss trains the head only, never the policy's weights. Rewards are unnormalised
reward-model scores, so while the head is still learning the value loss is large, and on a shared trunk its
gradient swamps the (whitened, ~0.1-sized) policy gradient: on the tiny test task a shared trunk drove KL to ~9
nats while the reward *fell*; detached, the same run raised the reward at KL ~1.5. `vfCoef` weights the value
loss in the summed loss (it matters through the common gradient-norm clip). The head is attached to the model
as `v_head`, so the optimizer, gradient clipping and DeepSpeed see it; it is saved as `value_head.safetensors`
next to the policy in every checkpoint (and restored on resume) and in the final output, and the policy
itself is saved without it, so the output loads as a plain causal LM (or PEFT adapter). Dropout is disabled
in the policy: the old and new log-probs of an update must come from the same function.

Logged per rollout: `objective/scores` (mean reward-model score), `objective/kl` (mean summed per-token KL to
the reference), `objective/non_score_reward`, `objective/rlhf_reward`, `completions/mean_length`; per update:
`loss/policy`, `loss/value`, `policy/clipfrac`, `val/clipfrac`, `policy/approxkl`, `val/mean`. Evaluation runs
rollouts on the eval prompts and reports `eval_objective/scores` and `eval_objective/kl`.

Not supported: DeepSpeed ZeRO-3 (generation would need the partitioned weights gathered every rollout) -
refused with a ConfigError before anything is loaded. ZeRO-1/2 are allowed; no test exercises them with PPO.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any, Optional

from . import register
from .base import Stage, StageContext

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_ATTR = "v_head"
_EPS = 1e-8


# ------------------------------------------------------------------------------------------------ helpers
def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_whiten(x, mask):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * (var + _EPS).rsqrt() * mask


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimates and returns over completion tokens. Positions past the end of a
    completion have reward and value 0 (mask), so the bootstrap value after the last real token is 0."""
    import torch

    rewards, values = rewards * mask, values * mask
    steps = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def attach_value_head(model):
    """A zero-initialised Linear(hidden, 1) as `model.v_head`, on the device of the LM head, in fp32."""
    import torch

    head = getattr(model, VALUE_HEAD_ATTR, None)
    if head is not None:
        return head
    hidden = model.config.get_text_config().hidden_size
    out_emb = model.get_output_embeddings()
    device = out_emb.weight.device if out_emb is not None else next(model.parameters()).device
    head = torch.nn.Linear(hidden, 1, device=device, dtype=torch.float32)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    setattr(model, VALUE_HEAD_ATTR, head)
    return head


def disable_dropout(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class RepeatedChunkSampler:
    """Shuffled indices, in chunks of `chunk` (one optimizer step's prompts over all processes), each chunk
    yielded `repeats` times in a row: the PPO trainer then sees every rollout batch `ppoEpochs` times."""

    def __init__(self, n: int, chunk: int, repeats: int, seed: int):
        self.n, self.chunk, self.repeats, self.seed = n, max(1, chunk), max(1, repeats), seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for start in range(0, self.n, self.chunk):
            part = order[start:start + self.chunk]
            for _ in range(self.repeats):
                yield from part

    def __len__(self) -> int:
        return self.n * self.repeats


class PromptCollator:
    """Rows -> left-padded prompt ids (what `generate` needs) + the raw prompts (what the reward model scores).
    Conversational prompts are rendered with the chat template and a generation prompt."""

    def __init__(self, tokenizer, max_prompt_length: int):
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length

    def __call__(self, rows: list[dict]) -> dict:
        tok = self.tokenizer
        prompts = [r["prompt"] for r in rows]
        conversational = isinstance(prompts[0], list)
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if conversational else p
                 for p in prompts]
        side = tok.truncation_side
        tok.truncation_side = "left"  # keep the end of a long prompt: the part the completion continues
        try:
            enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", truncation=True,
                      max_length=self.max_prompt_length, add_special_tokens=not conversational)
        finally:
            tok.truncation_side = side
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "prompts": prompts}


@dataclass
class Rollout:
    query: Any
    query_mask: Any
    response: Any
    response_mask: Any
    logprobs: Any
    values: Any
    advantages: Any
    returns: Any
    uses: int = 0


# ------------------------------------------------------------------------------------------------ trainer
def _trainer_class():
    """PPOTrainer is defined lazily: importing transformers at module import would slow `kubetune --help`."""
    import torch
    from accelerate.utils import DistributedType
    from transformers import GenerationConfig, Trainer

    class PPOTrainer(Trainer):
        def __init__(self, model, *, ref_model, scorer, params, args, train_dataset, eval_dataset=None,
                     processing_class, callbacks=None, max_prompt_length: int = 512):
            self.params = params
            self.scorer = scorer
            self.ref_model = ref_model
            disable_dropout(model)
            attach_value_head(model)
            if processing_class.pad_token is None:
                processing_class.pad_token = processing_class.eos_token
            super().__init__(
                model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                data_collator=PromptCollator(processing_class, max_prompt_length),
                processing_class=processing_class, callbacks=callbacks,
            )
            if self.ref_model is not None:
                self.ref_model.to(self.args.device)
            self.scorer.to(self.args.device)
            eos = self.model.generation_config.eos_token_id
            if eos is None:
                eos = processing_class.eos_token_id
            self._eos_ids = [eos] if isinstance(eos, int) else [e for e in (eos or []) if e is not None]
            self._generation_config = GenerationConfig(
                max_new_tokens=params.max_completion_length, do_sample=True, temperature=params.temperature,
                top_k=0, top_p=1.0, pad_token_id=processing_class.pad_token_id,
                eos_token_id=self._eos_ids or None, bos_token_id=self.model.generation_config.bos_token_id,
            )
            self._rollouts: OrderedDict = OrderedDict()
            self._stats: dict[str, list[float]] = defaultdict(list)

        # ---- data: each chunk of prompts is served ppo_epochs times in a row
        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            chunk = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * \
                max(1, self.args.world_size)
            return RepeatedChunkSampler(len(dataset), chunk, self.params.ppo_epochs, self.args.seed)

        def _value_head(self, model):
            return getattr(self.accelerator.unwrap_model(model), VALUE_HEAD_ATTR)

        # ---- forward passes
        def _forward(self, model, query, query_mask, response, response_mask, *, values: bool):
            ids = torch.cat([query, response], dim=1)
            mask = torch.cat([query_mask, response_mask], dim=1)
            # Left-padded prompts: positions count real tokens only, as generate() numbered them.
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                        output_hidden_states=values)
            start = query.shape[1] - 1
            logits = out.logits[:, start:-1].float() / self.params.temperature
            logprobs = logits.gather(-1, response.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
            vpred = None
            if values:
                head = self._value_head(model)
                # Detached: the value loss trains the head only (see the module docstring).
                hidden = out.hidden_states[-1][:, start:-1].detach()
                vpred = head(hidden.to(head.weight.dtype)).squeeze(-1)
            return logprobs, vpred

        def _reference_logprobs(self, model, unwrapped, query, query_mask, response, response_mask):
            if self.ref_model is not None:
                return self._forward(self.ref_model, query, query_mask, response, response_mask, values=False)[0]
            with unwrapped.disable_adapter():  # PEFT: the base without the adapter is the starting policy
                return self._forward(model, query, query_mask, response, response_mask, values=False)[0]

        @torch.no_grad()
        def _sample(self, model, inputs: dict) -> dict:
            """Generate, mask after EOS, score; log-probs (policy, reference) and values, all without grad.

            The log-probs go through the same (accelerate-prepared) model and mixed-precision autocast as the
            update's forward, so the first PPO pass sees a ratio of exactly 1, not bf16-vs-fp32 noise."""
            unwrapped = self.accelerator.unwrap_model(model)
            was_training = unwrapped.training
            unwrapped.eval()
            try:
                with self.accelerator.autocast():
                    query, query_mask = inputs["input_ids"], inputs["attention_mask"]
                    generated = unwrapped.generate(input_ids=query, attention_mask=query_mask,
                                                   generation_config=self._generation_config)
                    response = generated[:, query.shape[1]:]
                    if self._eos_ids:
                        is_eos = torch.isin(response, torch.tensor(self._eos_ids, device=response.device)).long()
                        after_eos = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first EOS
                    else:
                        after_eos = torch.zeros_like(response, dtype=torch.bool)
                    response_mask = (~after_eos).long()
                    response = response.masked_fill(after_eos, self.processing_class.pad_token_id)
                    logprobs, values = self._forward(model, query, query_mask, response, response_mask, values=True)
                    ref_logprobs = self._reference_logprobs(model, unwrapped, query, query_mask, response,
                                                            response_mask)
            finally:
                if was_training:
                    unwrapped.train()
            texts = self.processing_class.batch_decode(response, skip_special_tokens=True)
            prompts = inputs["prompts"]
            completions = [[{"role": "assistant", "content": t}] for t in texts] \
                if prompts and isinstance(prompts[0], list) else texts
            scores = torch.tensor(self.scorer(prompts=prompts, completions=completions), dtype=torch.float32,
                                  device=response.device)
            mask = response_mask.float()
            return {"query": query, "query_mask": query_mask, "response": response, "response_mask": response_mask,
                    "mask": mask, "logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values,
                    "scores": scores, "kl": ((logprobs - ref_logprobs) * mask).sum(1)}

        def _rollout(self, model, inputs: dict) -> Rollout:
            s = self._sample(model, inputs)
            mask, p = s["mask"], self.params
            non_score = -p.kl_coef * (s["logprobs"] - s["ref_logprobs"]) * mask
            rewards = non_score.clone()
            last = (s["response_mask"].sum(1) - 1).clamp(min=0)
            rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += s["scores"]
            values = s["values"] * mask
            advantages, returns = gae(rewards, values, mask, p.gamma, p.lam)
            advantages = masked_whiten(advantages, mask)
            self._record("objective/scores", s["scores"].mean())
            self._record("objective/kl", s["kl"].mean())
            self._record("objective/non_score_reward", non_score.sum(1).mean())
            self._record("objective/rlhf_reward", (s["scores"] + non_score.sum(1)).mean())
            self._record("completions/mean_length", mask.sum(1).mean())
            return Rollout(s["query"], s["query_mask"], s["response"], s["response_mask"], s["logprobs"], values,
                           advantages, returns)

        def _record(self, name: str, value) -> None:
            value = value.detach().float().reshape(1)
            self._stats[name].append(self.accelerator.gather(value).mean().item())

        # ---- one PPO update per optimizer (micro-)step
        def _rollout_for(self, model, inputs: dict) -> Rollout:
            ids = inputs["input_ids"]
            key = (tuple(ids.shape), ids.cpu().numpy().tobytes())
            rollout = self._rollouts.get(key)
            if rollout is None or rollout.uses >= self.params.ppo_epochs:
                rollout = self._rollout(model, inputs)
                self._rollouts[key] = rollout
                # Only the current step's micro-batches are revisited; anything older is dead.
                while len(self._rollouts) > 2 * max(1, self.args.gradient_accumulation_steps):
                    self._rollouts.popitem(last=False)
            rollout.uses += 1
            if rollout.uses >= self.params.ppo_epochs:
                self._rollouts.pop(key, None)
            return rollout

        def ppo_loss(self, model, r: Rollout):
            p = self.params
            mask = r.response_mask.float()
            logprobs, vpred = self._forward(model, r.query, r.query_mask, r.response, r.response_mask, values=True)
            log_ratio = (logprobs - r.logprobs) * mask
            ratio = torch.exp(log_ratio)
            pg1 = -r.advantages * ratio
            pg2 = -r.advantages * torch.clamp(ratio, 1.0 - p.clip_range, 1.0 + p.clip_range)
            pg_loss = masked_mean(torch.max(pg1, pg2), mask)
            v_clipped = r.values + torch.clamp(vpred - r.values, -p.value_clip_range, p.value_clip_range)
            vf1 = (vpred - r.returns) ** 2
            vf2 = (v_clipped - r.returns) ** 2
            vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
            self._record("loss/policy", pg_loss)
            self._record("loss/value", vf_loss)
            self._record("policy/clipfrac", masked_mean((pg2 > pg1).float(), mask))
            self._record("val/clipfrac", masked_mean((vf2 > vf1).float(), mask))
            self._record("policy/approxkl", 0.5 * masked_mean(log_ratio ** 2, mask))
            self._record("val/mean", masked_mean(vpred, mask))
            return pg_loss + p.vf_coef * vf_loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            model.train()
            inputs = self._prepare_inputs(inputs)
            rollout = self._rollout_for(model, inputs)
            with self.compute_loss_context_manager():
                loss = self.ppo_loss(model, rollout)
            kwargs = {}
            if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
                kwargs["scale_wrt_gas"] = False  # as in Trainer.training_step: the division below scales already
            loss = loss / self.current_gradient_accumulation_steps
            self.accelerator.backward(loss, **kwargs)
            return loss.detach()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            raise NotImplementedError("PPO has no supervised loss; training_step computes the PPO objective")

        # ---- evaluation: rollouts on the eval prompts
        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            if dataset is None:
                return {}
            scores, kls, lengths = [], [], []
            for batch in self.get_eval_dataloader(dataset):
                s = self._sample(self.model_wrapped, self._prepare_inputs(batch))
                scores.append(self.accelerator.gather_for_metrics(s["scores"]))
                kls.append(self.accelerator.gather_for_metrics(s["kl"]))
                lengths.append(self.accelerator.gather_for_metrics(s["mask"].sum(1)))
            metrics = {
                f"{metric_key_prefix}_objective/scores": torch.cat(scores).mean().item(),
                f"{metric_key_prefix}_objective/kl": torch.cat(kls).mean().item(),
                f"{metric_key_prefix}_completions/mean_length": torch.cat(lengths).mean().item(),
            }
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

        def log(self, logs: dict, start_time: Optional[float] = None) -> None:
            if self._stats and not any(k.startswith("eval_") for k in logs):
                logs = {**logs, **{k: sum(v) / len(v) for k, v in self._stats.items()}}
                self._stats.clear()
            super().log(logs, start_time)

        # ---- saving: the policy as a plain model/adapter, the value head beside it
        def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
            from peft import PeftModel
            from safetensors.torch import save_file

            output_dir = output_dir if output_dir is not None else self.args.output_dir
            unwrapped = self.accelerator.unwrap_model(self.model)
            prefix = VALUE_HEAD_ATTR + "."
            if state_dict is None and not isinstance(unwrapped, PeftModel):
                state_dict = unwrapped.state_dict()
            if state_dict is not None:
                state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
            super()._save(output_dir, state_dict=state_dict)
            if self.args.should_save:
                head = getattr(unwrapped, VALUE_HEAD_ATTR)
                save_file({k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()},
                          os.path.join(output_dir, VALUE_HEAD_FILE))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            from safetensors.torch import load_file

            super()._load_from_checkpoint(resume_from_checkpoint, model=model)
            path = os.path.join(resume_from_checkpoint, VALUE_HEAD_FILE)
            head = getattr(self.accelerator.unwrap_model(model if model is not None else self.model),
                           VALUE_HEAD_ATTR)
            if os.path.isfile(path):
                head.load_state_dict(load_file(path, device=str(head.weight.device)))
            else:
                log.warning("%s has no %s; the value head restarts from zero", resume_from_checkpoint,
                            VALUE_HEAD_FILE)

    return PPOTrainer


_PPO_TRAINER = None


def ppo_trainer_class():
    """The PPOTrainer class (built on first use)."""
    global _PPO_TRAINER
    if _PPO_TRAINER is None:
        _PPO_TRAINER = _trainer_class()
    return _PPO_TRAINER


def load_value_head(directory, hidden_size: int):
    """The value head saved next to a PPO policy (checkpoint or final output), as an nn.Linear."""
    import torch
    from safetensors.torch import load_file

    head = torch.nn.Linear(hidden_size, 1)
    head.load_state_dict(load_file(os.path.join(str(directory), VALUE_HEAD_FILE)))
    return head


@register
class PPOStage(Stage):
    name = "ppo"

    def build_trainer(self, ctx: StageContext):
        from transformers import TrainingArguments, set_seed

        from .. import adapters
        from ..errors import ConfigError
        from .dpo import frozen_reference
        from .rloo import load_scorer

        spec = ctx.spec
        p = spec.training.ppo
        if p is None:
            raise ConfigError("stage ppo needs spec.training.ppo.rewardModel", field="spec.training.ppo")
        ds = spec.distributed.deepspeed if spec.distributed else None
        if ds is not None and ds.zero_stage == 3:
            raise ConfigError("ppo generates from the policy every rollout, which ZeRO-3's partitioned weights do "
                              "not support here; use zeroStage 2", field="spec.distributed.deepspeed.zeroStage")
        scorer = load_scorer(ctx, p.reward_model, "spec.training.ppo.rewardModel")
        ref = frozen_reference(ctx)  # before wrapping: a copy of the starting weights (None with PEFT)
        # LoRA matrices are initialised randomly when the model is wrapped, before Trainer seeds anything: seed
        # first (as TRL's trainers do) so a run, and a restarted pod's run, start from the same adapter.
        set_seed(spec.training.seed)
        model = adapters.wrap(ctx.model, ctx.peft_config)
        # The collator needs the raw `prompt` column, which Trainer would drop as "unused by forward()".
        args = TrainingArguments(**{**ctx.training_args, "remove_unused_columns": False})
        max_prompt_length = max(1, spec.training.max_length - p.max_completion_length)
        return ppo_trainer_class()(
            model, ref_model=ref, scorer=scorer, params=p, args=args, train_dataset=ctx.train_dataset,
            eval_dataset=ctx.eval_dataset, processing_class=ctx.tokenizer, callbacks=list(ctx.callbacks),
            max_prompt_length=max_prompt_length,
        )
