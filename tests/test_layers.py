"""The house's arrows point down (DESIGN.md, "Layers"): a package imports only packages below
it, no module uses another module's _private names, only controlplane/kube_store.py talks to
the Kubernetes API. Walked from the source (ast), lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Floor of each package: a module may import its own package and those on lower floors.
FLOORS = {"pvlun": 4, "importer": 3, "cloner": 3, "virt": 3, "controlplane": 2, "csi": 1, "host": 0}
SIDEWAYS = {("importer", "cloner")}  # the importer clones through the cloner (DESIGN.md)
KUBE_CLIENT = "controlplane/kube_store.py"


def modules() -> list[Path]:
    return sorted(p for pkg in FLOORS for p in (ROOT / pkg).rglob("*.py") if "proto" not in p.parts)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every absolute import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def upward(path: Path) -> list[str]:
    own = path.relative_to(ROOT).parts[0]
    bad = []
    for line, module, _names in imports(path):
        target = module.split(".")[0]
        if target in FLOORS and target != own and FLOORS[target] >= FLOORS[own] and (own, target) not in SIDEWAYS:
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} (floor {FLOORS[target]} >= {FLOORS[own]})")
    return bad


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(path: Path) -> list[str]:
    """`from x import _y` (relative imports too) and `x._y` / `x.y._z` where x is a module of
    ours imported here."""
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(ROOT)
    bad, aliases = [], set()
    for node in ast.walk(tree):
        ours = isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").split(".")[0] in FLOORS)
        if ours:
            for a in node.names:
                if _private(a.name):
                    bad.append(f"{where}:{node.lineno} imports {'.' * node.level}{node.module or ''}.{a.name}")
                aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            aliases |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] in FLOORS}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        root = node.value
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(root, ast.Name) and root.id in aliases:
            bad.append(f"{where}:{node.lineno} uses {ast.unparse(node)}")
    return bad


def test_every_import_points_down():
    assert [b for p in modules() for b in upward(p)] == []


def test_no_module_uses_another_modules_private_names():
    assert [b for p in modules() for b in private_uses(p)] == []


def test_only_the_kube_store_imports_the_kubernetes_client():
    users = [str(p.relative_to(ROOT)) for p in modules()
             if any(m.split(".")[0] == "kubernetes" for _, m, _ in imports(p))]
    assert [u for u in users if u != KUBE_CLIENT] == []


@pytest.mark.parametrize("source, expected", [
    ("from importer.reconcile import key_of\n", ["csi/x.py:1 imports importer.reconcile (floor 3 >= 1)"]),
    ("def f():\n    import pvlun.cli\n", ["csi/x.py:2 imports pvlun.cli (floor 4 >= 1)"]),
    ("from host.command import run\nimport grpc\n", []),
])
def test_the_walk_sees_an_upward_arrow_also_inside_a_function(tmp_path, source, expected, monkeypatch):
    """The checker itself: a planted module on the csi floor."""
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    (tmp_path / "csi").mkdir()
    planted = tmp_path / "csi" / "x.py"
    planted.write_text(source)
    assert upward(planted) == expected


def test_the_walk_sees_a_private_name_used_through_a_module(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    (tmp_path / "virt").mkdir()
    planted = tmp_path / "virt" / "x.py"
    planted.write_text("from importer import reconcile as dv\nfrom csi.errors import _cut\nfrom .run_dir import _x\n"
                       "import importer.reconcile\n\ndv._phase(1)\nimporter.reconcile._save(2)\n")
    assert private_uses(planted) == ["virt/x.py:2 imports csi.errors._cut", "virt/x.py:3 imports .run_dir._x",
                                     "virt/x.py:6 uses dv._phase", "virt/x.py:7 uses importer.reconcile._save"]
