"""environment.yml (conda, documentation only) must not drift from pyproject.toml.

conda cannot be installed or solved on the CI machine, so the file is checked
by parsing: same Python, and the same exact (``==``) pins as pyproject.toml, in
both directions; the Makefile installs the same pins too.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
EDITABLE = re.compile(r"^-e\s+\.(\[(?P<extras>[^\]]*)\])?$")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def env() -> dict:
    with open(ROOT / "environment.yml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def exact_pins(requirements) -> dict[str, str]:
    """``{canonical name: version}`` of the requirements pinned with a single ``==``."""
    pins = {}
    for line in requirements:
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def conda_deps(env: dict) -> list[str]:
    return [d for d in env["dependencies"] if isinstance(d, str)]


def pip_list(env: dict) -> list[str]:
    lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(lists) == 1, "environment.yml must have exactly one `pip:` list"
    return lists[0]


def pyproject_pins(pyproject: dict) -> dict[str, str]:
    project = pyproject["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return exact_pins(reqs)


def test_environment_header(env):
    assert env["name"] == "detptq-mini"
    assert env["channels"] == ["conda-forge"]
    assert "pip" in conda_deps(env)


def test_python_matches_requires_python(env, pyproject):
    pythons = [d for d in conda_deps(env) if re.match(r"^python\s*[=<>!]", d)]
    assert pythons == ["python=3.11"], pythons
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    assert requires.contains("3.11"), f"requires-python {requires} excludes the python=3.11 of environment.yml"


def test_pip_list_is_pins_and_the_editable_package(env, pyproject):
    extras_known = set(pyproject["project"].get("optional-dependencies", {}))
    editables = []
    for item in pip_list(env):
        match = EDITABLE.match(item.strip())
        if match:
            editables.append({e.strip() for e in (match["extras"] or "").split(",") if e.strip()})
            continue
        specs = list(Requirement(item).specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{item!r} in environment.yml is not an exact pin"
    assert editables == [{"book", "test"}], "the pip list must install the package itself: -e .[book,test]"
    assert editables[0] <= extras_known, f"extras {editables[0] - extras_known} are not in pyproject.toml"


def test_pins_match_pyproject_both_ways(env, pyproject):
    env_pins = exact_pins(i for i in pip_list(env) if not EDITABLE.match(i.strip()))
    project_pins = pyproject_pins(pyproject)
    assert env_pins, "environment.yml pins nothing"
    missing_in_env = {k: v for k, v in project_pins.items() if env_pins.get(k) != v}
    missing_in_project = {k: v for k, v in env_pins.items() if project_pins.get(k) != v}
    assert not missing_in_env, f"pyproject.toml pins not in environment.yml (or different): {missing_in_env}"
    assert not missing_in_project, f"environment.yml pins not in pyproject.toml (or different): {missing_in_project}"


def test_makefile_installs_the_same_pins(pyproject):
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    make_pins = {canonicalize_name(n): v for n, v in re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][^\"'\s]*)", makefile)}
    project_pins = pyproject_pins(pyproject)
    differ = {k: (v, project_pins.get(k)) for k, v in make_pins.items() if project_pins.get(k) != v}
    assert not differ, f"Makefile pins differ from pyproject.toml (Makefile, pyproject): {differ}"
