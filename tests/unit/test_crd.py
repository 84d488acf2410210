"""The checked-in CRD is the generated one, and it is structural."""

from __future__ import annotations

from pathlib import Path

import yaml

from qwen_operator.api.crd import build_crd, crd_yaml

CHECKED_IN = Path(__file__).resolve().parents[2] / "manifests" / "crd" / "qwentrainingjobs.training.qwen.dev.yaml"
FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "definitions", "title", "patternProperties"}


def test_checked_in_crd_matches_the_models():
    assert CHECKED_IN.read_text() == crd_yaml(), "regenerate with: qwenctl crd > " + str(CHECKED_IN.relative_to(CHECKED_IN.parents[2]))


def _walk(node, path="schema"):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            if key in ("properties",):
                for name, sub in value.items():
                    yield from _walk(sub, f"{path}.{name}")
            elif key in ("items", "additionalProperties") and isinstance(value, dict):
                yield from _walk(value, f"{path}[]")


def test_schema_is_structural_and_described():
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    for path, node in _walk(spec, "spec"):
        assert not (FORBIDDEN & node.keys()), f"{path} uses {FORBIDDEN & node.keys()}"
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        if not path.endswith("[]"):  # list items and map values are described by their field
            assert node.get("description"), f"{path} has no description"
        if node.get("type") == "object" and "properties" in node:
            assert "additionalProperties" not in node


def test_cel_rules_have_messages_and_field_paths():
    spec = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = spec["x-kubernetes-validations"]
    assert len(rules) > 20
    for rule in rules:
        assert rule["message"] and rule["fieldPath"].startswith(".")
        assert "{world}" not in rule["rule"]


def test_printer_columns_and_status_subresource():
    version = build_crd()["spec"]["versions"][0]
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names[:5] == ["Stage", "Backend", "Phase", "Progress", "Age"]
    assert version["subresources"] == {"status": {}}
    assert yaml.safe_load(crd_yaml())["spec"]["names"]["shortNames"] == ["qtj"]


def test_immutability_rules_compare_the_field_first():
    """The comparison is true on almost every write (status patches cannot change the spec): evaluating it
    first skips the oldSelf.status lookups of the failure exception on those writes."""
    root = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = [r for r in root["x-kubernetes-validations"] if "immutable" in r["message"]]
    assert len(rules) > 10
    for rule in rules:
        assert rule["rule"].startswith("(has(self.spec.") and rule["rule"].endswith("['Failed', 'Invalid'])")
