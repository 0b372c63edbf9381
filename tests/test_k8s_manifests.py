"""Rendered pytorchjob.yaml as a cluster would judge it: the Kubeflow training-operator's PyTorchJob CRD schema
(tests/fixtures/k8s, training-operator v1.9.0), the operator's admission webhook, and the Kubernetes rules for
every name the manifest carries or the operator derives from it."""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from dapc.cli import main
from tests.conftest import REPO

SCHEMA_PATH = REPO / "tests" / "fixtures" / "k8s" / "pytorchjob-v1-openapi-schema.json"

# (id, recipe, overrides): 1 node on CPUs, 1 and several nodes of 8 GPUs, launch.env, image, namespace, secrets.
CASES = [
    ("tiny-cpu-1-node-env", "examples/tiny/recipe.yaml", ()),
    ("zero3-1-node-8-gpus", "recipes/zero3-cpt-llama3.1-8b.yaml", ()),
    ("llama3.1-8b-2-nodes-env", "recipes/cyber-dap-llama3.1-8b.yaml", ()),
    ("llama3.3-70b-32-nodes", "recipes/cyber-dap-llama3.3-70b.yaml", ("hardware.nodes=32",)),
    ("405b-qlora-image-namespace-env", "recipes/llama3.1-405b-qlora.yaml",
     ("launch.container_image=ghcr.io/acme/dapc:1.0", "launch.namespace=ml-team", "launch.env.NCCL_DEBUG=INFO")),
    ("llama3.1-8b-passthrough-secret", "recipes/cyber-dap-llama3.1-8b.yaml",
     ('launch.passthrough_env=["HF_TOKEN"]', "launch.secrets_name=hf-secrets")),
]

# k8s.io/apimachinery/pkg/util/validation/validation.go: each rule's pattern and longest value.
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_RULES = {
    "a DNS-1123 label": (_LABEL, 63),
    "a DNS-1123 subdomain": (rf"{_LABEL}(\.{_LABEL})*", 253),
    "a DNS-1035 label": (r"[a-z]([-a-z0-9]*[a-z0-9])?", 63),
    "a label value": (r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?", 63),
    "a qualified name": (r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]", 63),
    "a ConfigMap key": (r"[-._a-zA-Z0-9]+", 253),
    # Kubernetes itself allows '-' and '.' in env names too; launch.sh exports the same names, so C identifiers.
    "a C identifier": (r"[A-Za-z_][A-Za-z0-9_]*", None),
}
# Set by the operator after the container's own env (pkg/controller.v1/pytorch/envvar.go and master.go, v1.9.0);
# the kubelet keeps the last of two same-named entries, so a recipe's value for one of these would be dropped.
_OPERATOR_ENV = frozenset({"PYTHONUNBUFFERED", "MASTER_ADDR", "MASTER_PORT", "PET_MASTER_ADDR", "PET_MASTER_PORT",
                           "WORLD_SIZE", "RANK", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_NNODES"})
_CONFIG_MAP_MAX_BYTES = 1 << 20  # ValidateConfigMap: data and binaryData together at most core.MaxSecretSize


def _errors(path: str, value: object, rule: str) -> list[str]:
    pattern, max_length = _RULES[rule]
    if isinstance(value, str) and re.fullmatch(pattern, value) and len(value) <= (max_length or len(value)):
        return []
    return [f"{path}: {value!r} is not {rule} ({pattern}{f', at most {max_length} characters' if max_length else ''})"]


def _qualified_name_errors(path: str, value: str) -> list[str]:
    prefix, slash, name = value.rpartition("/")
    return (_errors(path, prefix, "a DNS-1123 subdomain") if slash else []) + _errors(path, name, "a qualified name")


def _to_json_schema(node: dict) -> dict:
    """Returns a copy of the CRD schema `node` that jsonschema applies as the API server does: an
    x-kubernetes-int-or-string node takes an integer or a string; an object with `properties` rejects unknown fields
    (server-side field validation, `kubectl --validate=strict`, the default since Kubernetes 1.27); a list-type set
    holds no duplicates (list-type map keys: `_list_map_keys_are_unique`)."""
    out = dict(node)
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out:
        out["properties"] = {name: _to_json_schema(child) for name, child in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    for key in ("additionalProperties", "items"):
        if isinstance(out.get(key), dict):
            out[key] = _to_json_schema(out[key])
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _list_map_keys_are_unique(validator, keys, instance, schema):
    """The API server refuses two items of an x-kubernetes-list-type: map list with equal key fields."""
    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        if not isinstance(item, dict):
            continue  # the items' `type: object` reports it
        key = tuple(json.dumps(item.get(k)) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entries for key {dict(zip(keys, map(json.loads, key)))}")
        seen.add(key)


_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("int32")
def _is_int32(value: object) -> bool:  # the operator decodes these into Go int32 fields
    return not isinstance(value, int) or -(1 << 31) <= value < 1 << 31


@_FORMATS.checks("int64")
def _is_int64(value: object) -> bool:
    return not isinstance(value, int) or -(1 << 63) <= value < 1 << 63


@functools.cache
def _validator() -> jsonschema.Validator:
    schema = _to_json_schema(json.loads(SCHEMA_PATH.read_text()))
    cls = jsonschema.validators.extend(jsonschema.Draft7Validator,
                                       {"x-kubernetes-list-map-keys": _list_map_keys_are_unique})
    cls.check_schema(schema)
    return cls(schema, format_checker=_FORMATS)


def _field_path(parts) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "<root>"


def _schema_errors(job: dict) -> list[str]:
    return sorted(f"{_field_path(e.absolute_path)}: {e.message}" for e in _validator().iter_errors(job))


def _webhook_errors(job: dict) -> list[str]:
    """Mirrors validatePyTorchJob, training-operator v1.9.0 pkg/webhooks/pytorch/pytorchjob_webhook.go. Its
    elasticPolicy and runPolicy checks are left out: dapc renders neither, and this says so if that changes."""
    errors = [f"spec.{key}: not mirrored here" for key in ("elasticPolicy", "runPolicy") if key in job["spec"]]
    errors += _errors("metadata.name", job["metadata"].get("name"), "a DNS-1035 label")  # NameIsDNS1035Label
    for role, replica_spec in job["spec"].get("pytorchReplicaSpecs", {}).items():
        path = f"spec.pytorchReplicaSpecs.{role}"
        if role not in ("Master", "Worker"):
            errors.append(f'{path}: Unsupported value: "{role}": supported values: "Master", "Worker"')
        containers = replica_spec.get("template", {}).get("spec", {}).get("containers", [])
        errors += [f"{path}.template.spec.containers[{i}].image: Required value" for i, c in enumerate(containers)
                   if not c.get("image")]
        if not any(c.get("name") == "pytorch" for c in containers):
            errors.append(f"{path}.template.spec.containers: Required value: must have at least one container with "
                          "name pytorch")
        replicas = replica_spec.get("replicas")
        if role == "Master" and replicas != 1:
            errors.append(f"{path}.replicas: Forbidden: must be 1")
        elif isinstance(replicas, int) and replicas < 1:
            errors.append(f"{path}.replicas: Forbidden: must be at least 1")
    return errors


def _object_meta_errors(kind: str, meta: dict) -> list[str]:
    errors = _errors(f"{kind} metadata.namespace", meta.get("namespace"), "a DNS-1123 label")  # ValidateNamespaceName
    for key, value in meta.get("labels", {}).items():
        errors += _qualified_name_errors(f"{kind} metadata.labels", key)
        errors += _errors(f"{kind} metadata.labels.{key}", value, "a label value")
    return errors


def _config_map_errors(config_map: dict) -> list[str]:
    errors = [] if (config_map.get("apiVersion"), config_map.get("kind")) == ("v1", "ConfigMap") else [
        f"ConfigMap: apiVersion/kind {config_map.get('apiVersion')}/{config_map.get('kind')}"]
    errors += _errors("ConfigMap metadata.name", config_map["metadata"].get("name"), "a DNS-1123 subdomain")
    errors += _object_meta_errors("ConfigMap", config_map["metadata"])
    data = config_map.get("data", {})
    for key, value in data.items():
        errors += _errors("ConfigMap data", key, "a ConfigMap key")
        errors += [] if isinstance(value, str) else [f"ConfigMap data.{key}: {type(value).__name__}, not a string"]
    size_bytes = sum(len(k) + len(str(v).encode()) for k, v in data.items())
    if size_bytes > _CONFIG_MAP_MAX_BYTES:
        errors.append(f"ConfigMap data: {size_bytes:,} bytes, more than {_CONFIG_MAP_MAX_BYTES:,}")
    return errors


def _derived_name_errors(job: dict) -> list[str]:
    """The operator names each pod and its headless Service NAME-<replica type>-<index> (GenGeneralName,
    pkg/core/utils.go; service.go); a Service name must be a DNS-1035 label (ValidateServiceName), 63 characters at
    most. Pods carry the label training.kubeflow.org/job-name=NAME (pkg/apis/kubeflow.org/v1/common_types.go)."""
    name = job["metadata"].get("name", "")
    errors = _errors("PyTorchJob label training.kubeflow.org/job-name", name, "a label value")
    for role, replica_spec in job["spec"].get("pytorchReplicaSpecs", {}).items():
        replicas = replica_spec.get("replicas", 1)
        if isinstance(replicas, int) and replicas > 0:  # the last index makes the longest name
            errors += _errors(f"{role} pod and Service name", f"{name}-{role.lower()}-{replicas - 1}",
                              "a DNS-1035 label")
    return errors


def _env_errors(path: str, env: list[dict]) -> list[str]:
    errors = []
    for i, entry in enumerate(env):
        errors += _errors(f"{path}[{i}].name", entry.get("name"), "a C identifier")
        if entry.get("name") in _OPERATOR_ENV:
            errors.append(f"{path}[{i}].name: {entry['name']} is set by the training-operator, after this entry")
        for ref in ("secretKeyRef", "configMapKeyRef"):
            if ref in entry.get("valueFrom", {}):
                source = entry["valueFrom"][ref]
                errors += _errors(f"{path}[{i}].valueFrom.{ref}.name", source.get("name"), "a DNS-1123 subdomain")
                errors += _errors(f"{path}[{i}].valueFrom.{ref}.key", source.get("key"), "a ConfigMap key")
    return errors


def _resource_name_errors(path: str, name: str) -> list[str]:
    # validateContainerResourceName (pkg/apis/core/validation): a standard resource, or a domain-qualified one.
    if "/" in name:
        return _qualified_name_errors(path, name)
    standard = name in ("cpu", "memory", "ephemeral-storage") or name.startswith("hugepages-")
    return [] if standard else [f"{path}: {name!r} is neither a standard resource nor domain-qualified"]


def _pod_template_errors(path: str, pod: dict, config_map_name: str) -> list[str]:
    errors = []
    volumes = {v.get("name"): v for v in pod.get("volumes", [])}
    for name, volume in volumes.items():
        errors += _errors(f"{path}.volumes.{name}", name, "a DNS-1123 label")
        for source, key in (("configMap", "name"), ("persistentVolumeClaim", "claimName"), ("secret", "secretName")):
            if source in volume:
                errors += _errors(f"{path}.volumes.{name}.{source}.{key}", volume[source].get(key),
                                  "a DNS-1123 subdomain")
    if "configMap" in volumes.get("plan", {}) and volumes["plan"]["configMap"].get("name") != config_map_name:
        errors.append(f"{path}.volumes.plan: mounts {volumes['plan']['configMap'].get('name')!r}, not the plan's "
                      f"ConfigMap {config_map_name!r}")
    for i, container in enumerate(pod.get("containers", [])):
        at = f"{path}.containers[{i}]"
        errors += _errors(f"{at}.name", container.get("name"), "a DNS-1123 label")
        image = container.get("image", "")
        if image != image.strip():
            errors.append(f"{at}.image: {image!r} has leading or trailing whitespace")
        errors += _env_errors(f"{at}.env", container.get("env", []))
        for resource in container.get("resources", {}).get("limits", {}):
            errors += _resource_name_errors(f"{at}.resources.limits", resource)
        errors += [f"{at}.volumeMounts[{j}].name: no volume {m.get('name')!r}"
                   for j, m in enumerate(container.get("volumeMounts", [])) if m.get("name") not in volumes]
    return errors


def _kubernetes_errors(config_map: dict, job: dict) -> list[str]:
    errors = _config_map_errors(config_map) + _object_meta_errors("PyTorchJob", job["metadata"])
    if job["metadata"].get("namespace") != config_map["metadata"].get("namespace"):
        errors.append("PyTorchJob metadata.namespace: differs from the ConfigMap's, whose plan its pods mount")
    errors += _derived_name_errors(job)
    nproc = job["spec"].get("nprocPerNode")  # the CRD: one of auto, cpu, gpu or an integer
    if not (nproc in ("auto", "cpu", "gpu") or isinstance(nproc, str) and nproc.isdigit()):
        errors.append(f"spec.nprocPerNode: {nproc!r} is not auto, cpu, gpu or an integer")
    for role, replica_spec in job["spec"].get("pytorchReplicaSpecs", {}).items():
        path = f"spec.pytorchReplicaSpecs.{role}"
        if replica_spec.get("restartPolicy", "Never") not in ("Always", "OnFailure", "Never", "ExitCode"):
            errors.append(f"{path}.restartPolicy: {replica_spec['restartPolicy']!r} is not Always, OnFailure, Never "
                          "or ExitCode")
        pod = replica_spec.get("template", {}).get("spec", {})
        errors += _pod_template_errors(f"{path}.template.spec", pod, config_map["metadata"].get("name"))
    return errors


def _manifest_errors(config_map: dict, job: dict) -> list[str]:
    return _schema_errors(job) + _webhook_errors(job) + _kubernetes_errors(config_map, job)


def _render(recipe: Path, out: Path, overrides=()) -> tuple[dict, dict, dict]:
    args = ["render", str(recipe), "-o", str(out)] + [a for s in overrides for a in ("--set", s)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    config_map, job = yaml.safe_load_all((out / "pytorchjob.yaml").read_text())
    return config_map, job, json.loads((out / "plan.json").read_text())


@pytest.mark.parametrize("recipe,overrides", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rendered_pytorchjob_passes_the_crd_schema_the_webhook_and_kubernetes_naming(tmp_path, recipe, overrides):
    config_map, job, plan = _render(REPO / recipe, tmp_path / "run", overrides)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert _manifest_errors(config_map, job) == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert sum(r["replicas"] for r in replicas.values()) == plan["batch"]["nodes"]  # the operator's PET_NNODES
    assert job["spec"]["nprocPerNode"] == str(plan["batch"]["gpus_per_node"])


@pytest.mark.parametrize("recipe_name,job_name", [
    ("405B_qlora.run", "dapc-405b-qlora-run"),  # a DNS-1035 label starts with a letter
    ("Cyber" * 12 + "DAP", "cyber" * 10),  # 63 characters: cut to 50, leaving room for -worker-31
])
def test_job_name_is_a_dns1035_label_with_room_for_the_pod_suffixes(tmp_path, recipe_name, job_name):
    config_map, job, _ = _render(REPO / "examples/tiny/recipe.yaml", tmp_path / "run", (
        f"name={recipe_name}", "hardware.nodes=32", "hardware.gpus_per_node=1", "training.global_batch_sequences=32"))
    assert (job["metadata"]["name"], config_map["metadata"]["name"]) == (job_name, f"{job_name}-plan")
    assert _manifest_errors(config_map, job) == []


@pytest.fixture(scope="module")
def two_node_manifest(tmp_path_factory) -> tuple[dict, dict]:
    config_map, job, _ = _render(REPO / "recipes/cyber-dap-llama3.1-8b.yaml", tmp_path_factory.mktemp("k8s") / "run")
    assert _manifest_errors(config_map, job) == []
    return config_map, job


def _worker(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]


def _container(job: dict) -> dict:
    return _worker(job)["template"]["spec"]["containers"][0]


def _limits(job: dict) -> dict:
    return _container(job)["resources"]["limits"]


_WORKER = "spec.pytorchReplicaSpecs.Worker"
_CONTAINER = f"{_WORKER}.template.spec.containers[0]"
_QUANTITY = json.loads(SCHEMA_PATH.read_text())["properties"]["spec"]["properties"]["pytorchReplicaSpecs"][
    "additionalProperties"]["properties"]["template"]["properties"]["spec"]["properties"]["containers"]["items"][
    "properties"]["resources"]["properties"]["limits"]["additionalProperties"]["pattern"]
BROKEN = [
    ("replicas-as-string", lambda cm, job: _worker(job).update(replicas="1"),
     [f"{_WORKER}.replicas: '1' is not of type 'integer'"]),
    ("replicas-beyond-int32", lambda cm, job: _worker(job).update(replicas=1 << 31),
     [f"{_WORKER}.replicas: 2147483648 is not a 'int32'"]),
    ("unknown-replica-type", lambda cm, job: job["spec"]["pytorchReplicaSpecs"].update(
        Launcher=job["spec"]["pytorchReplicaSpecs"].pop("Worker")),
     ['spec.pytorchReplicaSpecs.Launcher: Unsupported value: "Launcher": supported values: "Master", "Worker"']),
    ("unknown-field", lambda cm, job: job["spec"].update(nprocPerNod=job["spec"].pop("nprocPerNode")),
     ["spec: Additional properties are not allowed ('nprocPerNod' was unexpected)",
      "spec.nprocPerNode: None is not auto, cpu, gpu or an integer"]),
    ("quantity-not-a-quantity", lambda cm, job: _limits(job).update({"nvidia.com/gpu": "8 GPUs"}),
     [f"{_CONTAINER}.resources.limits.nvidia.com/gpu: '8 GPUs' does not match {_QUANTITY!r}"]),
    ("quantity-neither-integer-nor-string", lambda cm, job: _limits(job).update({"nvidia.com/gpu": 8.5}),
     [f"{_CONTAINER}.resources.limits.nvidia.com/gpu: 8.5 is not valid under any of the given schemas"]),
    ("duplicate-env-name", lambda cm, job: _container(job)["env"].append(dict(_container(job)["env"][0])),
     [f"{_CONTAINER}.env: duplicate entries for key {{'name': 'NCCL_DEBUG'}}"]),
    ("env-name-not-c-identifier", lambda cm, job: _container(job)["env"][0].update(name="NCCL-DEBUG"),
     [f"{_CONTAINER}.env[0].name: 'NCCL-DEBUG' is not a C identifier ([A-Za-z_][A-Za-z0-9_]*)"]),
    ("env-name-the-operator-sets", lambda cm, job: _container(job)["env"][0].update(name="PET_NNODES"),
     [f"{_CONTAINER}.env[0].name: PET_NNODES is set by the training-operator, after this entry"]),
    ("container-not-named-pytorch", lambda cm, job: _container(job).update(name="PyTorch"),
     [f"{_WORKER}.template.spec.containers: Required value: must have at least one container with name pytorch",
      f"{_CONTAINER}.name: 'PyTorch' is not a DNS-1123 label ({_LABEL}, at most 63 characters)"]),
    ("name-too-long-for-pod-suffixes", lambda cm, job: job["metadata"].update(name="a" * 55),
     [f"Master pod and Service name: '{'a' * 55}-master-0' is not a DNS-1035 label ([a-z]([-a-z0-9]*[a-z0-9])?, "
      "at most 63 characters)",
      f"Worker pod and Service name: '{'a' * 55}-worker-0' is not a DNS-1035 label ([a-z]([-a-z0-9]*[a-z0-9])?, "
      "at most 63 characters)"]),
    ("namespace-not-a-label", lambda cm, job: (cm["metadata"].update(namespace="ML_Team"),
                                               job["metadata"].update(namespace="ML_Team")),
     [f"ConfigMap metadata.namespace: 'ML_Team' is not a DNS-1123 label ({_LABEL}, at most 63 characters)",
      f"PyTorchJob metadata.namespace: 'ML_Team' is not a DNS-1123 label ({_LABEL}, at most 63 characters)"]),
]


@pytest.mark.parametrize("mutate,expected", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_validator_names_what_is_wrong_with_a_broken_manifest(two_node_manifest, mutate, expected):
    config_map, job = copy.deepcopy(two_node_manifest)
    mutate(config_map, job)
    assert _manifest_errors(config_map, job) == expected


def test_int_or_string_quantities_take_an_integer_or_a_quantity_string(two_node_manifest):
    for quantity in (8, "8", "500m", "1Gi"):
        config_map, job = copy.deepcopy(two_node_manifest)
        _limits(job)["nvidia.com/gpu"] = quantity
        assert _schema_errors(job) == [], quantity
