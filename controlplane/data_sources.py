"""Where a volume's first bytes come from: a claim is cloned from another claim or restored
from a snapshot, a DataVolume's claim from its pvc or snapshot source, a snapshot is taken of
a claim. A chain of these that comes back to where it started waits forever (each waits for
the next to be filled), so `pvlun apply` refuses the object that would close it, naming it.
"""

from __future__ import annotations

from typing import Any, Callable

Obj = dict[str, Any]
Node = tuple[str, str, str]  # ("PersistentVolumeClaim" | "VolumeSnapshot", namespace, name)
CLAIM, SNAPSHOT = "PersistentVolumeClaim", "VolumeSnapshot"
MAX_HOPS = 10_000  # a chain longer than any real one: stop looking


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _namespace(obj: Obj) -> str:
    return _dict(obj.get("metadata")).get("namespace") or "default"


def _dv_sources(dv_spec: dict, ns: str) -> list[Node]:
    source = _dict(dv_spec.get("source"))
    out = []
    for kind, node_kind in (("pvc", CLAIM), ("snapshot", SNAPSHOT)):
        ref = _dict(source.get(kind))
        if isinstance(ref.get("name"), str) and ref["name"]:
            out.append((node_kind, ref.get("namespace") or ns, ref["name"]))
    return out


def filled_from(obj: Obj) -> list[tuple[Node, list[Node]]]:
    """(what the object makes, what that is filled from) for each volume it makes."""
    kind, ns, spec = obj.get("kind"), _namespace(obj), _dict(obj.get("spec"))
    name = _dict(obj.get("metadata")).get("name")
    if kind == CLAIM:
        source = _dict(spec.get("dataSourceRef") or spec.get("dataSource"))
        node_kind = {CLAIM: CLAIM, SNAPSHOT: SNAPSHOT}.get(source.get("kind"))
        sources = [(node_kind, source.get("namespace") or ns, source["name"])] if node_kind and source.get("name") else []
        return [((CLAIM, ns, name), sources)]
    if kind == "DataVolume":
        return [((CLAIM, ns, name), _dv_sources(spec, ns))]
    if kind == "VirtualMachine":
        return [((CLAIM, ns, _dict(t.get("metadata")).get("name")), _dv_sources(_dict(t.get("spec")), ns))
                for t in spec.get("dataVolumeTemplates") or [] if isinstance(t, dict)]
    if kind == SNAPSHOT:
        claim = _dict(spec.get("source")).get("persistentVolumeClaimName")
        return [((SNAPSHOT, ns, name), [(CLAIM, ns, claim)] if claim else [])]
    return []


def _filled(obj: Obj) -> bool:
    """Made already (a bound claim, a ready snapshot, a DataVolume done): it waits on nothing,
    so a new claim may be restored from a snapshot of the claim it replaces."""
    status = _dict(obj.get("status"))
    return status.get("readyToUse") is True or status.get("phase") in ("Bound", "Succeeded")


def find_cycle(docs: list[Obj], stored: Callable[[str, str, str], Obj | None]) -> tuple[Obj, list[Node]] | None:
    """The first document whose volume would be filled, through its sources, from itself,
    and the chain; `stored(kind, name, namespace)` reads what the apply does not bring."""
    edges: dict[Node, list[Node]] = {}
    origin: dict[Node, Obj] = {}
    for doc in docs:
        for node, sources in filled_from(doc):
            edges[node] = sources
            origin.setdefault(node, doc)

    def sources_of(node: Node) -> list[Node]:
        if node not in edges:
            kind, ns, name = node
            found: list[Node] = []
            for obj in (stored(kind, name, ns), stored("DataVolume", name, ns) if kind == CLAIM else None):
                for made, sources in filled_from(obj) if obj and not _filled(obj) else []:
                    if made == node:
                        found += sources
            edges[node] = found
        return edges[node]

    for start, doc in origin.items():
        seen: set[Node] = set()
        todo = [(s, [start]) for s in sources_of(start)]
        hops = 0
        while todo and hops < MAX_HOPS:
            node, path = todo.pop()
            hops += 1
            if node == start:
                return doc, path + [start]
            if node not in seen:
                seen.add(node)
                todo += [(s, path + [node]) for s in sources_of(node)]
    return None


FIELDS = {CLAIM: "spec.dataSource", "DataVolume": "spec.source", "VirtualMachine": "spec.dataVolumeTemplates",
          SNAPSHOT: "spec.source.persistentVolumeClaimName"}


def cycle_message(doc: Obj, chain: list[Node]) -> str:
    """`spec.source: … would be filled from itself: claim a → claim b → claim a …`."""
    steps = " → ".join(f"{'claim' if kind == CLAIM else 'snapshot'} {ns}/{name}" for kind, ns, name in chain)
    return (f"{FIELDS.get(doc.get('kind', ''), 'spec')}: its volume would be filled from itself ({steps}): "
            "each would wait for the other forever")
