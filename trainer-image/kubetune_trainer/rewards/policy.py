"""Whether this job may run code it brings along: custom `module:function` rewards and `code_execution`.

The one place that decides it: a trainer flag the operator sets in the pod's env, `KUBETUNE_ALLOW_CUSTOM_CODE`
(`true`/`false`; unset means allowed, for `kubetune run` outside a cluster), rendered from the job's runtime
(`policy.allowCustomCode`, kubetune_operator.render). A FineTuneJob has no way to set trainer env itself.

    from kubetune_trainer.rewards import policy
    policy.require_custom_code("code_execution", field="spec.training.grpo.rewards[0].name")
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from ..errors import ConfigError

ENV_ALLOW_CUSTOM_CODE = "KUBETUNE_ALLOW_CUSTOM_CODE"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def custom_code_allowed(env: Optional[Mapping[str, str]] = None) -> bool:
    env = os.environ if env is None else env
    raw = env.get(ENV_ALLOW_CUSTOM_CODE, "").strip().lower()
    if raw in ("",) + _TRUE:
        return True
    if raw in _FALSE:
        return False
    # A value nobody meant: refuse rather than guess in the permissive direction.
    raise ConfigError(f"{ENV_ALLOW_CUSTOM_CODE}={raw!r} is not true/false", field=f"env {ENV_ALLOW_CUSTOM_CODE}")


def require_custom_code(what: str, field: str, env: Optional[Mapping[str, str]] = None) -> None:
    """ConfigError naming `field` when this job may not run code it brings along."""
    if not custom_code_allowed(env):
        raise ConfigError(f"{what} runs code that comes with the job, which this cluster does not allow for this "
                          f"job ({ENV_ALLOW_CUSTOM_CODE}=false, set from the job's runtime); use a built-in reward "
                          "or ask the platform team for a runtime that allows custom code", field=field)
