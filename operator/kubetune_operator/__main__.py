"""Run the kubetune operator.

    python -m kubetune_operator --standalone --namespace team-a --namespace team-b
    python -m kubetune_operator --peering kubetune --liveness http://0.0.0.0:8081/healthz   # several replicas
    KUBETUNE_METRICS_PORT=18080 python -m kubetune_operator --standalone --namespace dev    # local testing

Flags (each has an environment fallback, see settings.py for the rest of the configuration):
  --namespace NS          watch this namespace (repeatable; env KUBETUNE_WATCH_NAMESPACES=a,b). Default: all.
  --all-namespaces, -A    watch all namespaces (the default when no namespace is given).
  --standalone            no peering: this must be the only operator instance.
  --peering NAME          kopf peering under NAME (env KUBETUNE_PEERING_NAME): several replicas, one active.
  --priority N            peering priority (env KUBETUNE_PEERING_PRIORITY; default: random, so that two
                          replicas never tie: kopf pauses every replica when two live peers share a priority).
  --liveness URL          kopf's liveness endpoint, e.g. http://0.0.0.0:8081/healthz (env KUBETUNE_HEALTH_PORT
                          gives http://0.0.0.0:PORT/healthz).
  --verbose / --debug / --quiet, --log-format plain|full|json
Neither --standalone nor --peering: kopf's auto-detection (peering "default" if its object exists).
"""

from __future__ import annotations

import argparse
import gc
import getpass
import logging
import os
import random
import socket
import sys
import time
from typing import Optional


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m kubetune_operator",
                                 description="kubetune operator: FineTuneJob (kubetune.dev/v1alpha1) controller")
    ap.add_argument("-n", "--namespace", dest="namespaces", action="append", default=[],
                    help="namespace to watch (repeatable); default: all")
    ap.add_argument("-A", "--all-namespaces", action="store_true", help="watch all namespaces")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--standalone", action="store_true", help="run without peering")
    mode.add_argument("--peering", dest="peering_name", help="kopf peering name (several replicas)")
    ap.add_argument("--priority", type=int, help="peering priority")
    ap.add_argument("-L", "--liveness", dest="liveness_endpoint", help="liveness endpoint URL")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("-d", "--debug", action="store_true")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("--log-format", choices=["plain", "full", "json"], default="full")
    args = ap.parse_args(argv)
    if args.all_namespaces and args.namespaces:
        ap.error("--namespace and --all-namespaces exclude each other")
    return args


def own_identity() -> str:
    """The peer id kopf shows in the peering object: the pod name in a cluster (env POD_ID)."""
    return os.environ.get("POD_ID") or \
        f"{getpass.getuser()}@{socket.gethostname()}/{time.strftime('%Y%m%d%H%M%S')}/{os.getpid()}"


def plan(args: argparse.Namespace, env=os.environ) -> dict:
    """kopf.run() keyword arguments and the memo the startup handler reads, from flags and environment."""
    from .settings import OperatorSettings

    overrides: dict = {"peering_name": args.peering_name, "peering_priority": args.priority}
    if args.namespaces:
        overrides["watch_namespaces"] = tuple(args.namespaces)
    elif args.all_namespaces:
        overrides["watch_namespaces"] = ()
    settings = OperatorSettings.from_env(env, **overrides)
    standalone = bool(args.standalone)
    peering_name = None if standalone else settings.peering_name
    auto = not standalone and peering_name is None
    priority = settings.peering_priority
    if not standalone and priority is None:
        priority = random.SystemRandom().randint(1, 2**31 - 1)
    liveness = args.liveness_endpoint or (
        f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None)
    identity = own_identity()
    namespaces = list(settings.watch_namespaces)
    return {
        "kwargs": {
            "standalone": True if standalone else None,
            "peering_name": peering_name,
            "priority": priority,
            "liveness_endpoint": liveness,
            "clusterwide": not namespaces,
            "namespaces": namespaces,
            "identity": identity,
        },
        "memo": {
            "settings": settings,
            "identity": identity,
            "peering": {"standalone": standalone, "name": peering_name or "default", "priority": priority or 0,
                        "mandatory": not auto},
        },
    }


def quiet_per_event_logs(args: argparse.Namespace) -> None:
    """kopf logs "Handler '...' succeeded." at INFO for every watch event it hands us (about 7 per new job: 7,000
    lines for 1,000 jobs, and a measurable share of the operator's CPU). Unless --verbose or --debug asks for
    them, its per-object logger keeps only warnings and errors."""
    logging.getLogger("kopf.objects").setLevel(logging.NOTSET if args.verbose or args.debug else logging.WARNING)


def tune_gc(threshold: int) -> None:
    """Set the cyclic garbage collector for a process whose work is many small short-lived objects (each watch
    event's dicts) next to long-lived ones (imported modules, kopf's per-object memories). With Python's
    defaults (700, 10, 10), at 1,000 FineTuneJobs about 12 % of the operator's CPU went to the collector, more
    than half of it in full collections that each walked every object of every imported module (docs/scale.md).
    So: the objects alive after startup (~75,000) move to the permanent generation (`gc.freeze`, never walked
    again), and the youngest generation is collected when allocations minus deallocations of tracked objects
    reach `threshold` instead of 700, so fewer short-lived objects that are merely still in use get promoted to
    the older generations, whose collections are the expensive ones; those run after 20 collections of the next
    younger one instead of 10 (the setting measured). Unreachable cycles can live that much longer: up to
    `threshold` objects in the youngest generation, and cycles that die after promotion until the next
    collection of theirs. 0: Python's defaults, nothing frozen."""
    if threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold, 20, 20)


def without_kubernetes_client() -> None:
    """Keep the `kubernetes` package out of the operator's process where it is installed (a development
    environment with the CLI): the operator does not use it (kube.py, credentials.py), but kopf imports its
    models, ~10 MB of resident memory, when it can (docs/scale.md). The operator image does not install it."""
    if "kubernetes" not in sys.modules:
        sys.modules["kubernetes"] = None  # type: ignore[assignment]  - `import kubernetes` raises ImportError


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    without_kubernetes_client()
    import kopf

    from . import credentials, handlers  # handlers registers the handlers

    kopf.configure(verbose=args.verbose, debug=args.debug, quiet=args.quiet,
                   log_format=kopf.LogFormat[args.log_format.upper()])
    quiet_per_event_logs(args)
    try:
        p = plan(args)
    except ValueError as exc:
        print(f"kubetune-operator: bad configuration: {exc}", file=sys.stderr)
        return 2
    try:
        credentials.load()  # no usable credentials: say so once and exit, not a startup retry every minute
    except credentials.CredentialsError as exc:
        print(f"kubetune-operator: {exc}", file=sys.stderr)
        return 2
    tune_gc(p["memo"]["settings"].gc_threshold)
    kopf.run(memo=handlers.SharedMemo(**p["memo"]), **p["kwargs"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
