"""The package's layering, read from the source (every import, also those inside functions):

    ir/, text/                import nothing of pallax outside themselves
    model/, passes/,          import ir/ (and their own package; model/ also text/,
    pallas_kernels/, cpu_kernels/, sharding/      passes/ also sharding/: the shard pass)
    runtime/, scripts/        may import everything
    atomic_dir                imports nothing of pallax (a leaf every layer may use)

See docs/DESIGN.md. An arrow the other way is a design bug, not a shortcut."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LEAVES = {"pallax.atomic_dir"}
ALLOWED = {
    "ir": {"ir"},
    "model": {"ir", "model", "text"},
    "text": {"text"},
    "passes": {"ir", "passes", "sharding"},
    "pallas_kernels": {"ir", "pallas_kernels"},
    "cpu_kernels": {"ir", "cpu_kernels"},
    "sharding": {"ir", "sharding"},
    "atomic_dir": set(),
}
OPEN = {"runtime", "scripts"}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "build") or rel.parts[0].startswith("."):
            continue
        yield rel, path


def _pallax_imports(path: pathlib.Path, module: str):
    """(line, imported module) for every import of pallax in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module.rsplit(".", 1)[0] if not path.name == "__init__.py" else module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "pallax":
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if name.split(".")[0] != "pallax":
                continue
            if name == "pallax":  # from pallax import x: x is a module or a top-level name
                for a in node.names:
                    yield node.lineno, f"pallax.{a.name}"
            else:
                yield node.lineno, name


def _layer(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else None


def test_layering():
    checked, violations = 0, []
    for rel, path in _modules():
        module = ".".join(["pallax", *rel.with_suffix("").parts]).removesuffix(".__init__")
        top_init = len(rel.parts) == 1 and rel.name == "__init__.py"
        layer = None if top_init else rel.parts[0].removesuffix(".py")
        for line, target in _pallax_imports(path, module):
            checked += 1
            if target in LEAVES or layer in OPEN:
                continue
            if layer is None:
                violations.append(f"{rel}:{line} imports {target} (pallax/__init__ is lazy)")
                continue
            allowed = ALLOWED.get(layer)
            if allowed is None:
                violations.append(f"{rel}: layer {layer!r} has no rule in this test")
            elif _layer(target) not in allowed:
                violations.append(f"{rel}:{line}: {layer}/ imports {target}")
    assert checked > 100, "the import scan found too little to be reading the package"
    assert violations == [], "\n".join(violations)


@pytest.mark.parametrize(
    "source, target",
    [
        ("from pallax.passes import cast", "pallax.passes"),
        ("from pallax import passes", "pallax.passes"),
        ("import pallax.runtime.compiled", "pallax.runtime.compiled"),
        ("def f():\n    from pallax.runtime import checkpoint", "pallax.runtime"),
    ],
)
def test_the_scan_sees_every_import_form(tmp_path, source, target):
    file = tmp_path / "m.py"
    file.write_text(source)
    assert [t for _, t in _pallax_imports(file, "pallax.ir.m")] == [target]
