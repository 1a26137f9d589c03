"""The ValidatingAdmissionPolicies (admissionregistration.k8s.io/v1, no webhook) that refuse a FineTuneJob
asking what its runtime forbids, at `kubectl apply`. Generated here, next to the runtime schema they read,
and written by `python -m kubetune_api.crdgen` into helm/kubetune/files/admission/; the chart adds bindings.

Why two policies and a selector: a binding's paramRef names one param or selects several; it cannot pick the
param a field of the object names. So each policy is bound with `paramRef.selector: {}` (every runtime of its
kind; a namespaced FineTuneRuntime is looked up in the job's own namespace) and each rule first asks whether
this param is the job's runtime (`variables.mine`): the job is checked against exactly the runtime it names.
`parameterNotFoundAction: Allow`: with no runtime at all, and for a runtimeRef naming a runtime that does not
exist, the operator fails the job (RuntimeNotFound) before any pod; admission cannot say "no such param".

On UPDATE a rule only looks at the block it checks when that block changed: Kueue's suspend patches and the
operator's own writes must keep working after an admin tightens a runtime (running jobs keep their recorded
runtime, see kubetune_operator.runtimes). The operator repeats every check before it creates pods, so a cluster
without these policies (or an older Kubernetes) is no less safe, only later to say no.
"""

from __future__ import annotations

from .. import constants as C

POLICY_NAMES = {C.CLUSTER_RUNTIME_KIND: "kubetune-cluster-runtime", C.RUNTIME_KIND: "kubetune-namespaced-runtime"}


def _same(block: str, optional: bool = False) -> str:
    """CEL: on UPDATE, spec.<block> is what it was (so its rule need not look again)."""
    old, new = f"oldObject.spec.{block}", f"object.spec.{block}"
    if optional:
        same = f"(has({old}) == has({new}) && (!has({new}) || {old} == {new}))"
    else:
        same = f"{old} == {new}"
    return f"(request.operation == 'UPDATE' && {same})"


def _under(uri: str) -> str:
    """CEL: `uri` is allowed by the runtime's storage rules (pvc:// by allowedClaims, the rest by prefixes)."""
    return (f"({uri}.startsWith('pvc://') ? (has(params.spec.storage.allowedClaims) && "
            f"params.spec.storage.allowedClaims.exists(c, {uri}.startsWith('pvc://' + c + '/') || {uri} == 'pvc://' + c))"
            f" : (!has(params.spec.storage.allowedSourcePrefixes) || "
            f"params.spec.storage.allowedSourcePrefixes.exists(p, {uri}.startsWith(p))))")


def _custom(rewards: str) -> str:
    return f"{rewards}.exists(r, r.name.contains(':') || r.name == 'code_execution' || has(r.source))"


OVERRIDE = "(has(params.spec.policy.overrides) && '{0}' in params.spec.policy.overrides)"


def rules(kind: str) -> list[dict]:
    """The policy's validations: (expression, message naming the field) pairs, each with reason Forbidden."""
    spec, pol, res = "object.spec", "params.spec.policy", "params.spec.resources"
    out = [
        (f"{_same('stage')} || !has({pol}.allowedStages) || {spec}.stage in {pol}.allowedStages",
         f"'spec.stage: ' + {spec}.stage + ' is not allowed by the runtime ' + params.metadata.name"),
        (f"{_same('adapter')} || !has({pol}.allowedAdapters) || {spec}.adapter.type in {pol}.allowedAdapters",
         f"'spec.adapter.type: ' + {spec}.adapter.type + ' is not allowed by the runtime ' + params.metadata.name"),
        (f"{_same('model')} || {pol}.allowTrustRemoteCode || !has({spec}.model.trustRemoteCode) || "
         f"!{spec}.model.trustRemoteCode",
         "'spec.model.trustRemoteCode: the runtime ' + params.metadata.name + ' does not allow running code shipped "
         "with the model'"),
        (f"{_same('training')} || {pol}.allowCustomCode || ("
         f"(!has({spec}.training.grpo) || !{_custom(f'{spec}.training.grpo.rewards')}) && "
         f"(!has({spec}.training.rloo) || !has({spec}.training.rloo.rewards) || "
         f"!{_custom(f'{spec}.training.rloo.rewards')}))",
         "'spec.training: custom reward code (module:function, source or code_execution) is not allowed by the "
         "runtime ' + params.metadata.name"),
        (f"{_same('activeDeadlineSeconds', optional=True)} || !has({pol}.maxActiveDeadlineSeconds) || "
         f"!has({spec}.activeDeadlineSeconds) || {spec}.activeDeadlineSeconds <= {pol}.maxActiveDeadlineSeconds",
         f"'spec.activeDeadlineSeconds: above the maximum ' + string({pol}.maxActiveDeadlineSeconds) + ' of the "
         "runtime ' + params.metadata.name"),
        (f"{_same('resources')} || !has({res}.maxGpusPerNode) || {spec}.resources.gpus <= {res}.maxGpusPerNode",
         f"'spec.resources.gpus: ' + string({spec}.resources.gpus) + ' is above the maximum ' + "
         f"string({res}.maxGpusPerNode) + ' of the runtime ' + params.metadata.name"),
        (f"{_same('resources')} || !has({res}.maxNodes) || {spec}.resources.nodes <= {res}.maxNodes",
         f"'spec.resources.nodes: ' + string({spec}.resources.nodes) + ' is above the maximum ' + "
         f"string({res}.maxNodes) + ' of the runtime ' + params.metadata.name"),
        (f"{_same('resources')} || !has({spec}.resources.nodeSelector) || ({OVERRIDE.format('nodeSelector')} && "
         f"(!has(params.spec.template.nodeSelector) || {spec}.resources.nodeSelector.all(k, "
         f"!(k in params.spec.template.nodeSelector) || "
         f"params.spec.template.nodeSelector[k] == {spec}.resources.nodeSelector[k])))",
         "'spec.resources.nodeSelector: selects nodes the runtime ' + params.metadata.name + ' does not allow "
         "(policy.overrides, or a key the runtime sets)'"),
        (f"{_same('resources')} || !has({spec}.resources.tolerations) || {OVERRIDE.format('tolerations')}",
         "'spec.resources.tolerations: the runtime ' + params.metadata.name + ' does not let jobs add tolerations'"),
        (f"{_same('resources')} || !has({spec}.resources.affinity) || {OVERRIDE.format('affinity')}",
         "'spec.resources.affinity: the runtime ' + params.metadata.name + ' does not let jobs set affinity'"),
        (f"{_same('resources')} || !has({spec}.resources.priorityClassName) || "
         f"{OVERRIDE.format('priorityClassName')} || (has(params.spec.template.priorityClassName) && "
         f"params.spec.template.priorityClassName == {spec}.resources.priorityClassName)",
         "'spec.resources.priorityClassName: the runtime ' + params.metadata.name + ' does not let jobs choose a "
         "PriorityClass'"),
        (f"{_same('resources')} || !has({spec}.resources.cacheClaim) || "
         f"(has(params.spec.storage.allowedClaims) && {spec}.resources.cacheClaim in params.spec.storage.allowedClaims)"
         f" || (has({res}.cacheClaim) && {res}.cacheClaim == {spec}.resources.cacheClaim)",
         "'spec.resources.cacheClaim: PersistentVolumeClaim ' + object.spec.resources.cacheClaim + ' is not allowed "
         "by the runtime ' + params.metadata.name"),
        (f"{_same('output')} || ({spec}.output.uri.startsWith('pvc://') ? {_under(f'{spec}.output.uri')} : "
         f"(!has(params.spec.storage.allowedOutputPrefixes) || "
         f"params.spec.storage.allowedOutputPrefixes.exists(p, {spec}.output.uri.startsWith(p))))",
         "'spec.output.uri: ' + object.spec.output.uri + ' is outside the output locations the runtime ' + "
         "params.metadata.name + ' allows'"),
        (f"{_same('model')} || {_under(f'{spec}.model.source')}",
         "'spec.model.source: ' + object.spec.model.source + ' is outside the locations the runtime ' + "
         "params.metadata.name + ' allows'"),
        (f"{_same('model')} || !has({spec}.model.adapter) || {_under(f'{spec}.model.adapter')}",
         "'spec.model.adapter: ' + object.spec.model.adapter + ' is outside the locations the runtime ' + "
         "params.metadata.name + ' allows'"),
        (f"{_same('dataset')} || {spec}.dataset.train.all(s, {_under('s.uri')})",
         "'spec.dataset.train: a source is outside the locations the runtime ' + params.metadata.name + ' allows'"),
    ]
    if kind == C.CLUSTER_RUNTIME_KIND:
        out.insert(0, (
            "request.operation != 'CREATE' || !has(params.spec.namespaceSelector) || "
            "!has(params.spec.namespaceSelector.matchLabels) || params.spec.namespaceSelector.matchLabels.all(k, "
            "has(namespaceObject.metadata.labels) && k in namespaceObject.metadata.labels && "
            "namespaceObject.metadata.labels[k] == params.spec.namespaceSelector.matchLabels[k])",
            "'spec.runtimeRef.name: the ClusterFineTuneRuntime ' + params.metadata.name + ' is not granted to "
            "namespace ' + namespaceObject.metadata.name + ' (its namespaceSelector)'"))
    return [{"expression": f"!variables.mine || ({expr})", "messageExpression": msg, "reason": "Forbidden"}
            for expr, msg in out]


def policy(kind: str) -> dict:
    """The ValidatingAdmissionPolicy checking FineTuneJobs against runtimes of `kind`."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": POLICY_NAMES[kind],
                     "annotations": {"kubetune.dev/generated-by": "python -m kubetune_api.crdgen (do not edit)"}},
        "spec": {
            "failurePolicy": "Fail",
            "paramKind": {"apiVersion": C.API_VERSION, "kind": kind},
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [C.GROUP], "apiVersions": [C.VERSION], "operations": ["CREATE", "UPDATE"],
                "resources": [C.PLURAL]}]},
            "variables": [{"name": "mine", "expression":
                           f"has(object.spec.runtimeRef) && object.spec.runtimeRef.kind == '{kind}' && "
                           f"object.spec.runtimeRef.name == params.metadata.name"}],
            "validations": rules(kind),
        },
    }


def policies() -> list[dict]:
    return [policy(kind) for kind in (C.CLUSTER_RUNTIME_KIND, C.RUNTIME_KIND)]


def binding(kind: str, name: str | None = None) -> dict:
    """A binding of `kind`'s policy to every runtime of that kind (see the module docstring)."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name or POLICY_NAMES[kind]},
        "spec": {"policyName": POLICY_NAMES[kind], "validationActions": ["Deny"],
                 "paramRef": {"selector": {}, "parameterNotFoundAction": "Allow"}},
    }
