"""Kubernetes label selectors (metav1.LabelSelector), evaluated as apimachinery's
LabelSelectorAsSelector does: matchLabels and matchExpressions (In, NotIn, Exists,
DoesNotExist) all hold; an empty selector selects everything. `selector_string` is its
canonical form (requirements sorted by key, values sorted), which a pool's or replica set's
status.labelSelector carries for the HorizontalPodAutoscaler.
"""

from __future__ import annotations

from typing import Mapping

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
Requirement = tuple[str, str, tuple[str, ...]]


def requirements(selector: object, field: str = "spec.selector") -> list[Requirement]:
    """(key, operator, values) of a selector, sorted by key; ValueError names the field."""
    if selector is None:
        return []
    if not isinstance(selector, dict):
        raise ValueError(f"{field}: must be an object (matchLabels, matchExpressions)")
    out: list[Requirement] = []
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, dict):
        raise ValueError(f"{field}.matchLabels: must be a map of strings")
    for key, value in labels.items():
        if not isinstance(value, str):
            raise ValueError(f"{field}.matchLabels.{key}: must be a string")
        out.append((key, "=", (value,)))
    expressions = selector.get("matchExpressions") or []
    if not isinstance(expressions, list):
        raise ValueError(f"{field}.matchExpressions: must be a list")
    for i, expr in enumerate(expressions):
        where = f"{field}.matchExpressions[{i}]"
        if not isinstance(expr, dict) or not isinstance(expr.get("key"), str) or not expr["key"]:
            raise ValueError(f"{where}.key is required")
        operator, values = expr.get("operator"), expr.get("values") or []
        if operator not in OPERATORS:
            raise ValueError(f"{where}.operator: {operator!r} is not a valid label selector operator "
                             f"(one of {', '.join(OPERATORS)})")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{where}.values: must be a list of strings")
        if operator in ("In", "NotIn") and not values:
            raise ValueError(f"{where}.values: must be specified when `operator` is 'In' or 'NotIn'")
        if operator in ("Exists", "DoesNotExist") and values:
            raise ValueError(f"{where}.values: may not be specified when `operator` is 'Exists' or 'DoesNotExist'")
        out.append((expr["key"], operator, tuple(sorted(set(values)))))
    return sorted(out, key=lambda r: r[0])


def matches(selector: object, labels: Mapping[str, str] | None) -> bool:
    """Whether `labels` satisfy every requirement of `selector`."""
    labels = labels or {}
    for key, operator, values in requirements(selector):
        if operator in ("=", "In") and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def selector_string(selector: object) -> str:
    """The canonical string of a selector, as labels.Selector.String() writes it."""
    parts = []
    for key, operator, values in requirements(selector):
        if operator == "=":
            parts.append(f"{key}={values[0]}")
        elif operator == "In":
            parts.append(f"{key} in ({','.join(values)})")
        elif operator == "NotIn":
            parts.append(f"{key} notin ({','.join(values)})")
        elif operator == "Exists":
            parts.append(key)
        else:
            parts.append(f"!{key}")
    return ",".join(parts)
