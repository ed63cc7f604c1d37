"""The package's import structure, read from its source (for tests/test_architecture.py).

Every import of one patchmosaic module by another is collected (module-level and inside functions), with
the layer of each module: imports must run one way, from a higher layer to a lower one (or within a layer
without a cycle), and only ``patchmosaic.ops`` may import the compiled core.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set, Tuple

PKG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "patchmosaic")

# lower number = lower layer; a module may import modules of its own or lower layers
LAYERS = {
    "validation": 0, "schedules": 0, "metrics": 0, "io": 0, "data": 0,
    "ops": 1, "_core": 1,
    "machines": 2, "networks": 2,
    "index": 3, "distributed": 3,
    "diffusion": 4,
    "experiments": 5,
    "__init__": 6, "__main__": 6,
}


def modules() -> Dict[str, str]:
    """Dotted name (relative to the package) -> path, for every .py file of the package."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, PKG)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> List[str]:
    """Package-relative names imported by a ``from ... import ...`` in ``mod``."""
    if node.level == 0:
        if not (node.module or "").startswith("patchmosaic"):
            return []
        base = node.module.split(".")[1:]
    else:
        parts = mod.split(".") if mod != "__init__" else []
        if not is_pkg:
            parts = parts[:-1]
        up = node.level - 1
        base = (parts[: len(parts) - up] if up else parts) + (node.module.split(".") if node.module else [])
    names = []
    for alias in node.names:
        names.append(".".join(base + [alias.name]))
    return names


def imports() -> List[Tuple[str, str]]:
    """(importer, imported) pairs, imported names resolved to existing modules (or their package)."""
    mods = modules()
    pairs = []
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(mod, is_pkg, node)
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("patchmosaic.")]
            for t in targets:
                while t and t not in mods and t != "_core":
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != mod:
                    pairs.append((mod, t))
    return pairs


def layer(mod: str) -> int:
    return LAYERS[mod.split(".")[0]]


def cycles(pairs) -> List[List[str]]:
    """Import cycles between modules (each as a list of module names)."""
    graph: Dict[str, Set[str]] = {}
    for a, b in pairs:
        graph.setdefault(a, set()).add(b)
    found, state = [], {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    return found


# torch.Tensor's in-place version counter (no public name; torch's own checks read it)
TORCH_TENSOR_MEMBERS = {"_version"}


def private_reaches() -> List[str]:
    """``obj._name`` accesses where ``obj`` is not ``self``/``cls`` (reaching into another object's privates)."""
    out = []
    for mod, path in modules().items():
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls", "ctx"):
                    continue
                if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                    continue  # super()._name: this object's own base-class member, not another object's
                if isinstance(base, ast.Name) and base.id in ("torch", "np", "os", "sys"):
                    continue  # library namespaces (torch._C, ...) are not our objects
                if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name) and base.value.id == "torch":
                    continue
                if node.attr in TORCH_TENSOR_MEMBERS:
                    continue  # a torch tensor's own counter, read (ops/memo.py), not one of our objects' privates
                out.append(f"{mod}:{node.lineno}: .{node.attr}")
    return out
