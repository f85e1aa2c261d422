"""The wheel ships every subpackage: pyproject.toml lists packages by hand (the root is
the package), so a new folder left out of the list installs fine in editable mode and
breaks `import pallax` from a real wheel."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {"pallax"}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and rel.parts[0] in ("tests", "build", ".git") or "egg-info" in str(rel):
            continue
        if rel.parts:
            found.add(".".join(("pallax", *rel.parts)))
    assert found - listed == set(), (
        f"add these to pyproject.toml packages: {sorted(found - listed)}"
    )
