"""load_object: 'pkg.mod:attr' and 'file.py:attr', with errors that say what is wrong."""

import pytest

from bbzo.errors import ConfigError
from bbzo.references import load_object


def test_module_and_file_references(tmp_path, monkeypatch):
    assert load_object("bbzo.oracle:FunctionOracle").__name__ == "FunctionOracle"
    assert load_object("bbzo.oracle:FunctionOracle.query").__name__ == "query"
    f = tmp_path / "my_sim.py"
    f.write_text("STATE = []\ndef simulate(x):\n    return x * 2\n")
    fn = load_object(f"{f}:simulate")
    assert fn(3) == 6
    monkeypatch.chdir(tmp_path)
    assert load_object("my_sim.py:STATE") is load_object(f"{f}:STATE")  # one module per file
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "sim.py").write_text("class Simulator:\n    pass\n")
    assert load_object("mypkg.sim:Simulator").__name__ == "Simulator"  # the current folder is importable


@pytest.mark.parametrize("ref, message", [
    ("bbzo.oracle", "is not a reference"),
    ("no_such_pkg_xyz.sim:Sim", "no module named 'no_such_pkg_xyz'.*path/to/no_such_pkg_xyz/sim.py"),
    ("bbzo.oracle:Nope", "has no attribute 'Nope' \\(it defines: .*FunctionOracle"),
    ("missing/file.py:f", "file 'missing/file.py' not found"),
])
def test_errors(ref, message):
    with pytest.raises(ConfigError, match=message):
        load_object(ref)


def test_import_failures_say_where(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("import numpy\n\nraise RuntimeError('no license')\n")
    with pytest.raises(ConfigError, match="importing broken.py raised RuntimeError at broken.py:3: no license"):
        load_object(f"{f}:x")
    g = tmp_path / "needs.py"
    g.write_text("import definitely_not_installed_pkg\n")
    with pytest.raises(ConfigError, match="definitely_not_installed_pkg"):
        load_object(f"{g}:x")
