"""Which process am I, and how do the processes of one job train together.

    torchrun --nproc-per-node 2 -m kubetune_trainer --config job.yaml   # what the operator runs per node

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT; a plain
`python -m kubetune_trainer` has none of them and is rank 0 of 1. Everything here works in both cases and
imports torch only when it must (the CLI and the operator-side tests import this module).

The HF Trainer (through accelerate) creates the process group from TrainingArguments; `training_args_additions`
hands it the backend and the DeepSpeed config so both agree with the spec. `barrier()` / `any_rank()` use that
group, or create it with the same backend when called before the Trainer exists.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, Iterator, Optional

# Other ranks wait at a barrier while rank 0 uploads a checkpoint; torch's default 30 min collective timeout
# would kill a job uploading a large model's checkpoint over a slow link.
COLLECTIVE_TIMEOUT_S = 2 * 3600


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    try:
        return int(v) if v not in (None, "") else default
    except ValueError:
        return default


def rank() -> int:
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def world_size() -> int:
    return _env_int("WORLD_SIZE", 1)


def local_world_size() -> int:
    return _env_int("LOCAL_WORLD_SIZE", world_size())


def node_rank() -> int:
    """Which node (pod) this process runs on: torchrun's GROUP_RANK."""
    return _env_int("GROUP_RANK", rank() // max(1, local_world_size()))


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """Global rank 0: the one process that publishes results, reports and writes markers."""
    return rank() == 0


def is_local_main_process() -> bool:
    """Rank 0 of this node: the one process per pod that touches the pod's local disk for everyone."""
    return local_rank() == 0


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - the trainer image always has torch
        return False
    return torch.cuda.is_available()


def backend(spec=None) -> str:
    """torch.distributed backend: spec.distributed.backend, where auto = nccl with CUDA, gloo without."""
    chosen = getattr(getattr(spec, "distributed", None), "backend", None) or "auto"
    if chosen == "auto":
        return "nccl" if has_cuda() else "gloo"
    return chosen


def init_process_group(spec=None) -> bool:
    """Create the default process group if this is a multi-process run and nobody (accelerate) did yet.
    Returns whether a process group exists afterwards."""
    if not is_distributed():
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    be = backend(spec)
    if be == "nccl":
        import torch

        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=be, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return True


def barrier() -> None:
    """Wait for every rank (no-op in a single-process run)."""
    if not init_process_group():
        return
    import torch.distributed as dist

    dist.barrier()


@contextlib.contextmanager
def local_main_first(spec=None):
    """The body runs on this node's first process, then on the others: the pattern of accelerate's
    PartialState.local_main_process_first, for work whose result the others reuse from the node's disk
    (datasets' Arrow cache). Unlike accelerate's version the first process reaches the barrier even when the body
    raises (a DataError in the user's file): the others then run the body, hit the same error and report it,
    instead of hanging in the barrier until the collective timeout."""
    if not init_process_group(spec):
        yield
        return
    first = is_local_main_process()
    if not first:
        barrier()
    try:
        yield
    finally:
        if first:
            barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (one tiny all-reduce; no-op when single-process).

    Used for decisions that must be identical everywhere, e.g. "SIGTERM arrived: save and stop": a rank that
    stopped alone would leave the others hanging in the next gradient all-reduce."""
    if not init_process_group():
        return bool(flag)
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ---------------------------------------------------------------------------------------------- DeepSpeed
def deepspeed_config(spec) -> Optional[dict]:
    """The DeepSpeed config dict for spec.distributed.deepspeed (None without it).

    Batch sizes, gradient accumulation, clipping, precision and optimizer hyper-parameters are "auto": the HF
    Trainer fills them from TrainingArguments, so the spec's values are the only source and DeepSpeed cannot
    disagree with them. The optimizer comes from TrainingArguments too, except with offload: ZeRO-Offload
    steps the optimizer on the CPU, which needs DeepSpeed's own CPU Adam (the Trainer then builds DeepSpeed's
    AdamW from the same "auto" values; the LR schedule stays the Trainer's).
    """
    d = getattr(spec, "distributed", None)
    ds = getattr(d, "deepspeed", None)
    if ds is None:
        return None
    from .errors import ConfigError

    if not has_cuda():
        # A CUDA build of torch on a GPU-less machine would make DeepSpeed pick the CUDA accelerator.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    stage = int(ds.zero_stage)
    if ds.offload_params and stage != 3:
        raise ConfigError("offloadParams needs zeroStage 3 (only ZeRO-3 partitions parameters)",
                          field="spec.distributed.deepspeed.offloadParams")
    offload = bool(ds.offload_optimizer or ds.offload_params)
    adapter = getattr(getattr(spec, "adapter", None), "type", None)
    if offload and adapter == "galore":
        raise ConfigError("galore brings its own optimizer; it cannot run with DeepSpeed optimizer offload "
                          "(remove offloadOptimizer/offloadParams or use another adapter type)",
                          field="spec.distributed.deepspeed.offloadOptimizer")
    pin = has_cuda()  # pinned host memory speeds GPU<->CPU copies; meaningless (and wasteful) without a GPU
    zero: dict = {
        "stage": stage,
        "overlap_comm": has_cuda(),
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage >= 2:
        zero["allgather_bucket_size"] = 5e8
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "sub_group_size": 1e9,
            # save_model() writes a normal (consolidated) state dict, loadable with from_pretrained
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if ds.offload_optimizer or ds.offload_params:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    cfg: dict = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        # HF optimizers other than torch's AdamW (e.g. adafactor) are fine with ZeRO 1/2
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,  # metrics go through monitoring/, not DeepSpeed's stdout
        "wall_clock_breakdown": False,
    }
    if offload:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                         "weight_decay": "auto"}}
    return cfg


def training_args_additions(spec) -> dict:
    """TrainingArguments kwargs for multi-process / DeepSpeed runs (training_args.build merges them):
    ddp_backend and a collective timeout long enough for checkpoint uploads, and `deepspeed` = the config
    dict. Empty for a plain single-process run."""
    out: dict = {}
    ds = deepspeed_config(spec)
    if is_distributed() or ds is not None:
        out["ddp_backend"] = backend(spec)
        out["ddp_timeout"] = COLLECTIVE_TIMEOUT_S
    if ds is not None:
        out["deepspeed"] = ds
    return out


# ----------------------------------------------------------------------------------- ZeRO-3 at load time
def uses_zero3(spec) -> bool:
    ds = getattr(getattr(spec, "distributed", None), "deepspeed", None)
    return ds is not None and int(ds.zero_stage) == 3


def partition_at_load(training_kwargs: dict) -> Optional[Any]:
    """Make `from_pretrained` build ZeRO-3 models already partitioned (deepspeed.zero.Init) instead of
    materialising every weight on every rank. Call before loading; keep the returned object alive until the
    Trainer exists (None when the config is not ZeRO-3).

    transformers decides at `from_pretrained` time from a module-level weakref to the live DeepSpeed config;
    a TrainingArguments built from the same kwargs the stage will use registers it, with its "auto" values
    (precision, batch sizes) filled exactly as the Trainer's own will be. Only rank 0 then reads the checkpoint
    (the other ranks read shapes only) and each rank keeps 1/world of the weights.
    """
    ds = training_kwargs.get("deepspeed")
    if not ds or int(ds.get("zero_optimization", {}).get("stage", 0)) != 3:
        return None
    if is_distributed():
        import deepspeed

        # zero.Init sizes the partitions from deepspeed.comm's world. accelerate initialises deepspeed.comm only
        # on accelerators (not for use_cpu runs), and only once TrainingArguments' devices are set up; without
        # it DeepSpeed sees a world of 1 and rejects the batch sizes. This wraps the existing process group.
        deepspeed.init_distributed(dist_backend=training_kwargs.get("ddp_backend") or backend(),
                                   auto_mpi_discovery=False, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    from transformers import TrainingArguments

    return TrainingArguments(**training_kwargs)


@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Load a model normally while a ZeRO-3 config is live: for loads on ONE rank (merging the adapter for
    publishing, the forgetting check on the saved model). Under zero.Init such a load would wait forever for
    the other ranks to join the partitioning collectives."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover - the trainer image has transformers
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
