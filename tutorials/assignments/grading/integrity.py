"""Integrity checks read from a student file's syntax tree (imports, dynamic imports), never executed."""

from __future__ import annotations

import ast

from .core import Failure

# ------------------------------------------------------------------------------------------------ integrity (AST)


def _dotted(node) -> str | None:
    """'a.b.c' for a Name / Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


_DYNAMIC = (
    "import_module",
    "__import__",
    "spec_from_file_location",
    "run_path",
    "run_module",
    "load_module",
    "SourceFileLoader",
    "module_from_spec",
    "exec_module",
)


class _Imports:
    """What a module imports, read from its syntax tree: ``names`` maps each bound name to the dotted path it
    stands for ('tl' -> 'triton.language', 'softmax' -> 'torch.softmax'); ``modules`` every module imported."""

    def __init__(self, tree: ast.AST):
        self.names: dict[str, str] = {}
        self.modules: list[tuple[str, int]] = []
        self.dynamic: list[tuple[str, int]] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.modules.append((a.name, node.lineno))
                    if a.asname:
                        self.names[a.asname] = a.name
                    else:
                        root = a.name.split(".")[0]
                        self.names[root] = root
            elif isinstance(node, ast.ImportFrom):
                base = ("." * node.level) + (node.module or "")
                self.modules.append((base, node.lineno))
                for a in node.names:
                    self.modules.append((f"{base}.{a.name}", node.lineno))
                    self.names[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Call):
                f = self.resolve(node.func) or ""
                bare = isinstance(node.func, ast.Name) and f in ("exec", "eval", "compile", "__import__")
                if bare or f.split(".")[-1] in _DYNAMIC:
                    self.dynamic.append((f, node.lineno))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value.startswith("minimtp.") and node.value.replace(".", "").replace("_", "").isalnum():
                    self.modules.append((node.value, node.lineno))  # sys.modules["minimtp.x"] and the like

    def resolve(self, node) -> str | None:
        d = _dotted(node)
        if d is None:
            return None
        head, _, rest = d.partition(".")
        base = self.names.get(head, head)
        return f"{base}.{rest}" if rest else base


def _check_imports(mod, allowed_minimtp: tuple[str, ...], bug: str) -> None:
    """Every import of a ``minimtp`` module must be one of ``allowed_minimtp`` (or inside one); no dynamic imports,
    exec or eval. Also every attribute path read through ``import minimtp`` (``minimtp.speculative.verify``)."""
    tree = ast.parse(mod.__source__)
    imp = _Imports(tree)
    for f, line in imp.dynamic:
        raise Failure(bug, f"line {line}: {f}(...): dynamic imports, exec and eval are not allowed in this "
                      "assignment (the grader checks imports statically)")  # fmt: skip

    def ok(path: str) -> bool:
        return any(path == a or path.startswith(a + ".") for a in allowed_minimtp)

    for name, line in imp.modules:
        if (name == "minimtp" or name.startswith("minimtp.")) and name != "minimtp" and not ok(name):
            if not any(a.startswith(name + ".") for a in allowed_minimtp):  # "from minimtp import sampling" is fine
                raise Failure(bug, f"line {line}: imports {name} (allowed from minimtp: {', '.join(allowed_minimtp)})")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "ctx", None), ast.Store):
            path = imp.resolve(node) or ""
            if path.startswith("minimtp.") and not ok(path) and not any(a.startswith(path + ".")
                                                                        for a in allowed_minimtp):  # fmt: skip
                raise Failure(bug, f"line {node.lineno}: uses {path} (allowed from minimtp: "
                              f"{', '.join(allowed_minimtp)})")  # fmt: skip
        if isinstance(node, ast.Call) and (imp.resolve(node.func) or "").split(".")[-1] == "getattr":
            if node.args and (imp.resolve(node.args[0]) or "").split(".")[0] == "minimtp":
                raise Failure(bug, f"line {node.lineno}: getattr on a minimtp module")
