"""Generate the QwenTrainingJob CustomResourceDefinition from the pydantic models.

pydantic emits JSON Schema 2020-12; the API server wants a structural OpenAPI v3 subset. This module inlines
`$ref`s, turns `Optional[X]` into plain X (absent means unset), `Literal` into enums, free-form dicts into
`x-kubernetes-preserve-unknown-fields`, and adds the CEL rules declared in `qwen_trainer.spec.rules`.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from qwen_trainer.spec.rules import cel_rules

from .resource import (
    GROUP,
    KIND,
    MUTABLE_FIELDS,
    PLACEMENT_CEL,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    QwenTrainingJobSpec,
    QwenTrainingJobStatus,
)

_DROP = {"title", "examples", "discriminator", "readOnly", "writeOnly", "deprecated", "$defs", "const"}

# The total process count, for rules that need it; mirrors Resources.processes().
WORLD_CEL = (
    "self.resources.nodes * (has(self.resources.processesPerNode) ? self.resources.processesPerNode"
    " : (self.resources.gpusPerNode > 0 ? self.resources.gpusPerNode : 1))"
)


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        target.update(extra)  # the field's own description and default win over the model's
        return _resolve(target, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    node = {k: v for k, v in node.items() if k not in _DROP}
    # Optional[X] -> X
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {len(options)} types structurally: {options}")
        merged = dict(options[0])
        merged.update({k: v for k, v in node.items() if k != "default" or v is not None})
        return _structural(merged)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("type") == "object":
        props = node.get("properties")
        addl = node.get("additionalProperties")
        if props is None and (addl is None or addl is True or addl == {}):
            node.pop("additionalProperties", None)
            node["x-kubernetes-preserve-unknown-fields"] = True
        elif props is None and isinstance(addl, dict):
            node["additionalProperties"] = _structural(addl)
        if props is not None:
            node["properties"] = {k: _structural(v) for k, v in props.items()}
            node.pop("additionalProperties", None)
            for name, sub in node["properties"].items():
                # A field with a default_factory has no default in pydantic's schema (Optional fields carry
                # default None): give such objects `{}` so the API server fills their nested defaults too.
                optional_or_required = "default" in props[name] or name in node.get("required", [])
                if sub.get("type") == "object" and "properties" in sub and not optional_or_required:
                    sub["default"] = {}
    if node.get("type") == "array" and "items" in node:
        node["items"] = _structural(node["items"])
        node.setdefault("maxItems", 64)
    if node.get("type") == "string" and "enum" not in node:
        node.setdefault("maxLength", 4096)
    if node.get("type") == "object" and "additionalProperties" in node:
        node.setdefault("maxProperties", 64)
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node and not isinstance(node[key], bool):
            bound = node.pop(key)
            node["minimum" if key == "exclusiveMinimum" else "maximum"] = bound
            node[key] = True
    if "description" in node:
        node["description"] = " ".join(str(node["description"]).split())
    return node


def schema_of(model) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _structural(_resolve(raw, defs))


# A job that failed (or was refused) may be fixed and re-applied; a pipeline then resumes at the failed step.
_FIXABLE = "(has(oldSelf.status) && has(oldSelf.status.phase) && oldSelf.status.phase in ['Failed', 'Invalid'])"


def _immutability_rules(spec_schema: dict[str, Any]) -> list[dict[str, Any]]:
    """Root-level transition rules (they need oldSelf.status): each spec field but the mutable ones stays as it
    was, unless the job has failed.

    The API server evaluates every rule on every write, status patches included, and each field access copies
    the schemas of the object's properties, so these rules are a visible share of its CPU per write. The field
    comparison comes first: it is true on almost every write (status patches cannot change the spec), so the
    failure check on oldSelf.status is only reached when the field did change (`||` is commutative in CEL, so
    the same writes are refused)."""
    rules = []
    for name in spec_schema["properties"]:
        if name in MUTABLE_FIELDS:
            continue
        new, old = f"self.spec.{name}", f"oldSelf.spec.{name}"
        rules.append(
            {
                "rule": f"(has({new}) == has({old}) && (!has({new}) || {new} == {old})) || {_FIXABLE}",
                "message": f"spec.{name} is immutable while the job has not failed (only "
                f"{', '.join('spec.' + f for f in MUTABLE_FIELDS)} may change)",
                "fieldPath": f".spec.{name}",
                "reason": "FieldValueForbidden",
            }
        )
    return rules


def _single_stage_only(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job-spec rules describe one stage; a pipeline's steps are checked by the operator, step by step."""
    out = []
    for rule in rules:
        out.append({**rule, "rule": f"!has(self.stage) || ({rule['rule']})"})
    return out


def build_crd() -> dict[str, Any]:
    spec_schema = schema_of(QwenTrainingJobSpec)
    spec_schema["x-kubernetes-validations"] = [
        {"rule": "has(self.stage) != has(self.pipeline)", "message": "set exactly one of spec.stage and spec.pipeline",
         "fieldPath": ".stage", "reason": "FieldValueRequired"},
        *_single_stage_only(cel_rules(WORLD_CEL)),
        *PLACEMENT_CEL,
    ]
    status_schema = schema_of(QwenTrainingJobStatus)
    status_schema["properties"]["conditions"].update(
        {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    )
    status_schema["properties"]["conditions"]["items"]["required"] = ["type", "status", "reason", "lastTransitionTime"]
    status_schema["properties"]["derived"] = {
        "type": "object",
        "description": status_schema["properties"]["derived"].get("description", ""),
        "x-kubernetes-preserve-unknown-fields": True,
    }
    _strip_defaults(status_schema)  # status is written by the operator, never defaulted
    root = {
        "type": "object",
        "description": "A Qwen training stage (convert, pretrain, finetune, export, evaluate) run as a Kubeflow PyTorchJob.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            # Kubernetes allows any 63-character name here: the children's names are shortened with a hash
            # suffix where theirs would be too long (see render.child_name).
            "metadata": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 63}}},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    root["x-kubernetes-validations"] = [
        *_immutability_rules(spec_schema),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["all", "qwen"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
                        {"name": "Backend", "type": "string", "jsonPath": ".spec.model.backend"},
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                        {"name": "Nodes", "type": "integer", "priority": 1, "jsonPath": ".spec.resources.nodes"},
                        {"name": "GPUs", "type": "integer", "priority": 1,
                         "jsonPath": ".spec.resources.gpusPerNode"},
                        {"name": "Restarts", "type": "integer", "priority": 1, "jsonPath": ".status.restarts"},
                        {"name": "Started", "type": "date", "priority": 1, "jsonPath": ".status.startTime"},
                        {"name": "Duration", "type": "string", "priority": 1, "jsonPath": ".status.duration"},
                        {"name": "Message", "type": "string", "priority": 1,
                         "jsonPath": ".status.conditions[?(@.type==\"Succeeded\")].message"},
                    ],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def _strip_defaults(node: Any) -> None:
    if isinstance(node, dict):
        node.pop("default", None)
        for v in node.values():
            _strip_defaults(v)
    elif isinstance(node, list):
        for v in node:
            _strip_defaults(v)


def crd_yaml() -> str:
    return "# Generated from the pydantic models by `qwenctl crd`; do not edit.\n" + yaml.safe_dump(
        build_crd(), sort_keys=False, width=120
    )
