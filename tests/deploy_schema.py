"""The part of Kubernetes' CRD handling the deploy tests need, without an API server: whether an
OpenAPI v3 schema is structural (apiextensions' rules, over the keywords our CRDs use), and whether
an object validates against one with unknown fields refused, as `kubectl apply` (strict field
validation) refuses them. Deliberately small: what it does not know it reports, never passes."""

from __future__ import annotations

import re
from typing import Any

INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]
KEYWORDS = {"type", "format", "description", "properties", "additionalProperties", "items", "required", "enum",
            "nullable", "pattern", "maxItems", "minItems", "maximum", "minimum", "maxLength", "minLength",
            "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "anyOf"}
TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool}


def structural_errors(schema: dict, path: str = "") -> list[str]:
    """Why `schema` is not structural (empty if it is): every node typed unless it is
    int-or-string or keeps unknown fields, no logical junctors but int-or-string's own anyOf,
    properties and additionalProperties never together, one schema for array items, required
    fields that exist, no keyword outside what apiextensions and this checker know."""
    where = path or "<root>"
    if not isinstance(schema, dict):
        return [f"{where}: a schema must be an object"]
    errors = [f"{where}: unknown keyword {k!r}" for k in schema if k not in KEYWORDS]
    if schema.get("x-kubernetes-preserve-unknown-fields", True) is not True:
        errors.append(f"{where}: x-kubernetes-preserve-unknown-fields may only be true")
    if schema.get("x-kubernetes-int-or-string"):
        if "type" in schema or schema.get("anyOf", INT_OR_STRING) != INT_OR_STRING:
            errors.append(f"{where}: int-or-string takes no type and only anyOf integer, string")
        return errors
    if "anyOf" in schema:
        errors.append(f"{where}: anyOf outside int-or-string")
    kind = schema.get("type")
    if kind is None and not schema.get("x-kubernetes-preserve-unknown-fields"):
        errors.append(f"{where}: no type")
    elif kind is not None and kind not in TYPES:
        errors.append(f"{where}: unknown type {kind!r}")
    if "properties" in schema and "additionalProperties" in schema:
        errors.append(f"{where}: properties and additionalProperties together")
    if kind != "object" and ("properties" in schema or "additionalProperties" in schema):
        errors.append(f"{where}: fields on a {kind}")
    for name in schema.get("required", []):
        if name not in schema.get("properties", {}):
            errors.append(f"{where}: required {name!r} is not a property")
    for value in schema.get("enum", []):
        if kind in TYPES and not _is(value, kind):
            errors.append(f"{where}: enum value {value!r} is not a {kind}")
    for name, sub in schema.get("properties", {}).items():
        errors += structural_errors(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        errors += structural_errors(schema["additionalProperties"], f"{path}.*")
    elif "additionalProperties" in schema:
        errors.append(f"{where}: additionalProperties must be a schema")
    if kind == "array":
        if not isinstance(schema.get("items"), dict):
            errors.append(f"{where}: an array needs one items schema")
        else:
            errors += structural_errors(schema["items"], f"{path}[]")
    return errors


def crd_root_errors(schema: dict) -> list[str]:
    """What apiextensions requires of a CRD's root beyond structure: an object whose metadata
    is left to the API server (no restrictions but on name), with spec and status."""
    errors = structural_errors(schema)
    if schema.get("type") != "object":
        errors.append("<root>: must be an object")
    if set(schema.get("properties", {}).get("metadata", {})) - {"type", "description"}:
        errors.append(".metadata: may only be typed object")
    return errors


def _is(value: Any, kind: str) -> bool:
    return isinstance(value, TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))


def validation_errors(value: Any, schema: dict, path: str = "") -> list[str]:
    """Why `value` does not validate against `schema` (empty if it does); a field the schema
    neither lists nor keeps is an error, as with `kubectl apply`'s strict field validation."""
    where = path or "<root>"
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: must not be null"]
    if schema.get("x-kubernetes-int-or-string"):
        if not (_is(value, "integer") or isinstance(value, str)):
            return [f"{where}: must be an integer or a string"]
        if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
            return [f"{where}: {value!r} does not match {schema['pattern']}"]
        return []
    kind = schema.get("type")
    if kind is None:
        return []  # a node keeping unknown fields, untyped: anything
    if not _is(value, kind):
        return [f"{where}: must be of type {kind}, not {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    if kind == "string" and "pattern" in schema and not re.search(schema["pattern"], value):
        return [f"{where}: {value!r} does not match {schema['pattern']}"]
    if kind == "array":
        errors = [f"{where}: more than {schema['maxItems']} items"] if len(value) > schema.get("maxItems", len(value)) else []
        for i, item in enumerate(value):
            errors += validation_errors(item, schema["items"], f"{path}[{i}]")
        return errors
    if kind != "object":
        return []
    errors = [f"{where}: {name} is required" for name in schema.get("required", []) if name not in value]
    properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
    for name, item in value.items():
        if name in properties:
            errors += validation_errors(item, properties[name], f"{path}.{name}")
        elif isinstance(extra, dict):
            errors += validation_errors(item, extra, f"{path}.{name}")
        elif not schema.get("x-kubernetes-preserve-unknown-fields"):
            errors.append(f"{where}: unknown field {name!r}")
    return errors


def object_errors(obj: dict, schema: dict) -> list[str]:
    """A whole object against a CRD's root schema: metadata is the API server's (a name is all
    it must have here), everything else is the schema's."""
    meta = obj.get("metadata")
    errors = [] if isinstance(meta, dict) and meta.get("name") else ["metadata.name is required"]
    rest = {k: v for k, v in obj.items() if k != "metadata"}
    return errors + validation_errors(rest, {**schema, "required": [r for r in schema.get("required", [])
                                                                    if r != "metadata"]})
