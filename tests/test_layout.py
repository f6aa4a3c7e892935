"""The package layout: core imports no task package, tasks never import each other, and every task's
registered runners resolve."""

import ast
from pathlib import Path

import pytest

import spine
from spine.registry import TASKS, get_task

PACKAGE = Path(spine.__file__).parent
TASK_PACKAGES = sorted(name.split(".")[1] for name in (v.split(":")[0] for v in TASKS.values()))


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports (relative imports resolved against its package)."""
    package = list(path.relative_to(PACKAGE.parent).parent.parts)  # e.g. ['spine', 'core']
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}
    return out


def files_of(package: str) -> list[Path]:
    return sorted((PACKAGE / package).rglob("*.py"))


def offending(package: str, forbidden: list[str]) -> list[str]:
    return [
        f"{f.relative_to(PACKAGE.parent)} imports {m}"
        for f in files_of(package)
        for m in sorted(imported_modules(f))
        if any(m == f"spine.{p}" or m.startswith(f"spine.{p}.") for p in forbidden)
    ]


def test_core_imports_no_task_package():
    assert files_of("core")
    assert offending("core", TASK_PACKAGES) == []


@pytest.mark.parametrize("task", TASK_PACKAGES)
def test_a_task_package_imports_no_other_task(task):
    assert files_of(task)
    assert offending(task, [t for t in TASK_PACKAGES if t != task]) == []


def test_the_import_check_catches_a_crossing():
    fake = PACKAGE / "core" / "_probe_for_test.py"
    fake.write_text("from spine.lumbar.task import LEVELS\nfrom ..cervical import ct\n")
    try:
        assert offending("core", TASK_PACKAGES) == [
            "spine/core/_probe_for_test.py imports spine.cervical",
            "spine/core/_probe_for_test.py imports spine.cervical.ct",
            "spine/core/_probe_for_test.py imports spine.lumbar.task",
            "spine/core/_probe_for_test.py imports spine.lumbar.task.LEVELS",
        ]
    finally:
        fake.unlink()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_runner_of_a_task_resolves_inside_its_package(name):
    task = get_task(name)
    assert task.name == name and TASKS[name].startswith(f"spine.{name}.")
    for stage, target in task.runners.items():
        assert target.startswith(f"spine.{name}."), f"{name}: runner {stage} lives outside its package"
        assert callable(task.runner(stage))
