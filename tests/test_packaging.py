"""Every package of the source tree is installed: pyproject's package list covers each folder with an __init__.py."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    dirs = {pkg: Path(d) for pkg, d in conf["package-dir"].items()}
    found = set()
    for pkg, d in dirs.items():
        for init in (ROOT / d).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / d)
            found.add(".".join([pkg, *rel.parts]))
    assert found <= listed, f"not installed: {sorted(found - listed)}"
