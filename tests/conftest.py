"""Fixtures shared by the test files."""

import importlib.util

import pytest

from spine.core.config import REPO_ROOT


@pytest.fixture(scope="session")
def stage_script():
    """Load a script of ``src/`` (e.g. ``"02_localize"``) as a module; its ``main(argv)`` runs it."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "src" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
