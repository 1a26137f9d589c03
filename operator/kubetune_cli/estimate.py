"""`kubetune estimate MANIFEST`: the per-GPU and per-node memory breakdown of a FineTuneJob, and whether it
fits the GPUs it asks for (kubetune_api.memory). Torch-free: runs wherever the client CLI runs.

    kubetune estimate examples/multinode-deepspeed.yaml --model-config examples/model-configs/llama-3.3-70b.json
    kubetune estimate job.yaml                       # config.json read from spec.model.source (file://, hf://)
    kubetune estimate job.yaml --gpu-memory 80Gi     # when the nodeSelector does not say (nvidia.com/gpu.memory)

Exit codes: 0 fits (or nothing to compare against), 1 does not fit (the message has the fixes), 2 the input
cannot be estimated (manifest, config.json or GPU memory unreadable).

Where config.json comes from: --model-config (a file or a model folder), else spec.model.source when this
machine can read it (file:// paths, hf:// through the Hugging Face cache or hub). s3:// and pvc:// models sit
behind the job's own credentials or volume: download config.json and pass --model-config.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from kubetune_api import memory, parse_job


class EstimateError(Exception):
    """The estimate cannot be made; the message says which input and how to provide it."""


def read_model_config(source: str, model_config: Optional[str] = None, revision: Optional[str] = None) -> dict:
    """config.json as a dict, from --model-config or the model's source URI."""
    if model_config:
        p = Path(model_config)
        p = p / "config.json" if p.is_dir() else p
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise EstimateError(f"--model-config {model_config}: cannot read a JSON config ({exc})") from None
    if source.startswith("file://"):
        p = Path(source[len("file://"):]) / "config.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise EstimateError(f"spec.model.source: cannot read {p} ({exc}); pass --model-config") from None
    if source.startswith("hf://"):
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise EstimateError("spec.model.source is on the Hugging Face hub but huggingface_hub is not "
                                "installed here: pass --model-config with the model's config.json") from None
        try:
            return json.loads(Path(hf_hub_download(source[len("hf://"):], "config.json", revision=revision)).read_text())
        except Exception as exc:  # noqa: BLE001 - offline, gated, missing: all mean "give me the file"
            raise EstimateError(f"spec.model.source: cannot get config.json of {source} ({type(exc).__name__}); "
                                "pass --model-config") from None
    raise EstimateError(f"spec.model.source {source} is not readable from here (the job's credentials or volume "
                        "hold it): download its config.json and pass --model-config PATH")


def _runtime_gib(path: Optional[str]) -> Optional[float]:
    """gpu.memoryGiB of a ClusterFineTuneRuntime/FineTuneRuntime manifest (None without one)."""
    if not path:
        return None
    import yaml

    from kubetune_api.finetuneruntime import parse_runtime

    rt = parse_runtime((yaml.safe_load(Path(path).read_text()) or {}).get("spec") or {})
    return rt.gpu.memory_gib if rt.gpu else None


def run(manifest: str, model_config: Optional[str] = None, gpu_memory: Optional[str] = None,
        runtime: Optional[str] = None) -> tuple[int, str]:
    """(exit code, text) for one manifest."""
    try:
        import yaml

        job = parse_job(yaml.safe_load(Path(manifest).read_text()))
    except Exception as exc:  # noqa: BLE001 - unreadable file, YAML or schema error: say which
        return 2, f"{manifest}: not a FineTuneJob manifest: {str(exc).splitlines()[0][:300]}"
    spec = job.spec
    try:
        cfg = read_model_config(spec.model.source, model_config, spec.model.revision)
        shape = memory.ModelShape.from_config(cfg)
        default = memory.parse_quantity(gpu_memory) if gpu_memory else None
    except (EstimateError, memory.ModelConfigError) as exc:
        return 2, str(exc)
    except ValueError as exc:
        return 2, f"--gpu-memory: {exc} (e.g. 80Gi)"
    try:
        runtime_gib = _runtime_gib(runtime)
    except Exception as exc:  # noqa: BLE001 - unreadable file, YAML or schema error: say which
        return 2, f"--runtime {runtime}: not a runtime manifest: {str(exc).splitlines()[0][:300]}"
    available, source = memory.declared_gpu_memory(spec, default, runtime_gib)
    if gpu_memory:  # an explicit flag wins over what the nodeSelector suggests
        available, source = default, "--gpu-memory"
    est = memory.estimate(spec, shape)
    lines = [f"{job.metadata.name}: {spec.stage} {spec.adapter.type}, {spec.resources.nodes} node(s) x "
             f"{spec.resources.gpus} GPU(s)", memory.format_estimate(est, available, source)]
    if spec.resources.gpus == 0:
        lines.append("no GPUs requested: nothing to compare against")
        return 0, "\n".join(lines)
    if not available:
        lines.append("GPU memory unknown (no nvidia.com/gpu.memory or gpu.product nodeSelector): pass --gpu-memory")
        return 0, "\n".join(lines)
    verdict = memory.check(spec, shape, available, source)
    if verdict is None:
        lines.append(f"fits: ~{memory.gib(est.gpu_total)} of {memory.gib(available)} GiB per GPU")
        if spec.resources.memory and est.host_total > memory.parse_quantity(spec.resources.memory):
            lines.append(f"but host memory: ~{memory.gib(est.host_total)} GiB per node exceeds resources.memory "
                         f"{spec.resources.memory}")
            return 1, "\n".join(lines)
        return 0, "\n".join(lines)
    lines.append(f"does not fit: {verdict.message()}")
    return 1, "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The command's arguments (kubetune_cli.app registers the subcommand with them)."""
    ap.add_argument("manifest", help="FineTuneJob YAML")
    ap.add_argument("--model-config", help="the model's config.json (file or folder); default: read from "
                    "spec.model.source when it is file:// or hf://")
    ap.add_argument("--gpu-memory", help="memory per GPU, e.g. 80Gi (default: --runtime's gpu.memoryGiB, else the "
                    "nodeSelector's nvidia.com/gpu.memory or gpu.product)")
    ap.add_argument("--runtime", help="the job's ClusterFineTuneRuntime/FineTuneRuntime manifest (its gpu.memoryGiB "
                    "is the memory per GPU), e.g. examples/runtimes/cluster-h100.yaml")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="kubetune estimate", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    code, text = run(args.manifest, args.model_config, args.gpu_memory, args.runtime)
    print(text, file=sys.stdout if code != 2 else sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
