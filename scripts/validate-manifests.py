#!/usr/bin/env python3
"""Strict schema validation of Kubernetes manifests (rendered chart, examples).

Built-in kinds are checked with kubernetes-validate's strict schemas (unknown
fields are errors) for every --kube-version. Kinds of a CRD given with --crd are
checked against that CRD's openAPIV3Schema, made strict the way the API server
prunes (an object with `properties` and no `additionalProperties` or
`x-kubernetes-preserve-unknown-fields` refuses unknown fields); CEL rules
(`x-kubernetes-validations`) need an API server and are not evaluated here.
Prometheus Operator kinds are skipped with a printed reason; any other kind
without a schema is an error, never a silent pass.
"""
import argparse
import copy
import sys

import jsonschema
import yaml
from kubernetes_validate import utils as kv

SKIPPED_GROUPS = {
    "monitoring.coreos.com": "a Prometheus Operator CRD (no schema in kubernetes-validate)",
}


def strict_crd_schema(node):
    """openAPIV3Schema (structural) -> JSON Schema with the API server's pruning made an error."""
    if isinstance(node, list):
        return [strict_crd_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_crd_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    if node.get("x-kubernetes-embedded-resource"):
        out.setdefault("properties", {}).update({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                  "metadata": {"type": "object"}})
    return out


def load_crds(paths):
    schemas = {}  # (group, version, kind) -> JSON Schema
    for path in paths:
        for crd in kv.resources_from_file(path):
            if crd.get("kind") != "CustomResourceDefinition":
                sys.exit(f"{path}: not a CustomResourceDefinition")
            spec = crd["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                props = schema.setdefault("properties", {})
                props.setdefault("apiVersion", {"type": "string"})
                props.setdefault("kind", {"type": "string"})
                # metadata is validated by the API server, not by the CRD's schema.
                props["metadata"] = {"type": "object"}
                schemas[(spec["group"], version["name"], spec["names"]["kind"])] = strict_crd_schema(schema)
    return schemas


def name_of(resource):
    return f'{resource.get("kind", "?")}/{(resource.get("metadata") or {}).get("name", "?")}'


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", "--kube-version", action="append", required=True)
    parser.add_argument("--crd", action="append", default=[], help="a CRD file whose kinds may appear")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    crds = load_crds(args.crd)
    failures = checked = 0
    skipped = set()
    for path in args.files:
        for resource in kv.resources_from_file(path):
            api_version = resource.get("apiVersion", "")
            group, _, version = api_version.rpartition("/")
            key = (group, version, resource.get("kind"))
            where = f"{path}: {name_of(resource)} ({api_version})"
            if group in SKIPPED_GROUPS:
                skipped.add(f"{resource.get('kind')} ({api_version}): {SKIPPED_GROUPS[group]}")
                continue
            if key in crds:
                errors = sorted(jsonschema.Draft7Validator(crds[key]).iter_errors(resource), key=str)
                for e in errors:
                    print(f"ERROR {where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")
                failures += bool(errors)
                checked += 1
                continue
            for kube in args.kube_version:
                try:
                    kv.validate(resource, kube, strict=True)
                except kv.ValidationError as e:
                    print(f"ERROR {where} against Kubernetes {kube}: "
                          f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}")
                    failures += 1
                except kv.SchemaNotFoundError:
                    print(f"ERROR {where}: no schema for this kind in Kubernetes {kube} "
                          "(give its CRD with --crd)")
                    failures += 1
            checked += 1
    for reason in sorted(skipped):
        print(f"SKIP {reason}")
    if crds:
        print("NOTE CRD CEL rules (x-kubernetes-validations) need an API server; not evaluated here")
    print(f"{checked} objects checked strictly against Kubernetes {', '.join(args.kube_version)}"
          f"{' and ' + str(len(crds)) + ' CRD version(s)' if crds else ''}: {failures} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
