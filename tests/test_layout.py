"""The package layout the contract fixes: every source folder is a package setuptools knows about."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = {"crds": "agentbox.crds", "operator": "agentbox.operator", "api": "agentbox.api",
                "sandbox": "agentbox.sandbox"}


def declared_packages() -> set[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(pyproject["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_declared():
    expected = set()
    for folder, package in SOURCE_ROOTS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            expected.add(".".join([package, *relative.parts]))
    missing = expected - declared_packages()
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_no_declared_package_lacks_its_folder():
    package_dirs = {package: ROOT / folder for folder, package in SOURCE_ROOTS.items()}
    for package in declared_packages():
        root = ".".join(package.split(".")[:2])
        path = package_dirs[root].joinpath(*package.split(".")[2:])
        assert (path / "__init__.py").is_file(), f"{package} is declared but {path} has no __init__.py"


def test_the_standard_library_operator_module_is_not_shadowed():
    import operator

    import agentbox.operator

    assert hasattr(operator, "itemgetter")
    assert Path(agentbox.operator.__file__).parent == ROOT / "operator"
