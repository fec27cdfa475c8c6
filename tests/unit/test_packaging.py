"""Every package of the source tree ships: pyproject.toml lists packages by hand (schedules/
installs as qcompile.schedules), and a package left out works in an editable install but is
missing from `pip install .`."""

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"qcompile": ROOT / "qcompile", "qcompile.schedules": ROOT / "schedules"}


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = set()
    for prefix, directory in SOURCES.items():
        for init in directory.rglob("__init__.py"):
            parts = init.parent.relative_to(directory).parts
            found.add(".".join([prefix, *parts]))
    assert found - listed == set(), "packages missing from pyproject.toml"
