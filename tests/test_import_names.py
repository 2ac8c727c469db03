"""The test tree never shadows an installed module: its folders (kernels, ops, nn, ...) import as
``tests.<folder>``, so a distribution with the same top-level name (peft pulls in one called
``kernels``, which diffusers' LoRA loader imports) stays importable while the tests run."""
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _folders() -> list[Path]:
    return sorted(p for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def test_every_test_folder_is_a_subpackage_of_tests():
    assert (TESTS / "__init__.py").is_file(), "tests/ must be a package, or pytest puts it on sys.path"
    assert __name__ == "tests.test_import_names", __name__
    missing = [p.name for p in _folders() if not (p / "__init__.py").is_file()]
    assert not missing, f"test folders without __init__.py (they would import under their bare names): {missing}"


def test_no_bare_folder_name_resolves_into_the_test_tree():
    """``import kernels`` (or ops, nn, ...) finds an installed module or nothing, never a test folder."""
    for folder in _folders():
        spec = importlib.util.find_spec(folder.name)
        if spec is None or spec.origin is None:
            continue
        assert not Path(spec.origin).resolve().is_relative_to(TESTS), (folder.name, spec.origin)


def test_the_test_package_name_is_no_installed_distribution():
    """The one top-level name the test tree claims, ``tests``, belongs to no installed distribution."""
    owners = importlib.metadata.packages_distributions().get("tests", [])
    assert not owners, f"installed distributions ship a top-level 'tests' that this test tree shadows: {owners}"
    assert sys.modules["tests"].__file__ == str(TESTS / "__init__.py")
