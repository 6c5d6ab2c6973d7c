"""The source tree's imports only point down: infra/ (run directories, tracking, process groups), then models/ and
losses/, then data_gen/, then eval/ (which reads data_gen's records and chat templates), the training stages and
the entry on top, bench/ above them. Read from the code itself (ast), imports inside functions included."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

# A package may import itself and any package of a lower rank; never one of its own rank or above.
RANKS = {"infra": 0, "models": 1, "losses": 1, "data_gen": 2, "eval": 3, "train": 4, "bench": 5, "tests": 6}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import of one of our packages in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in RANKS]
    return found


def upward_imports(root: Path) -> list[str]:
    wrong = []
    for package, rank in RANKS.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, imported in imported_packages(path):
                if imported != package and RANKS[imported] >= rank:
                    wrong.append(f"{path.relative_to(root)}:{line} imports {imported} "
                                 f"(rank {RANKS[imported]} >= {package}'s {rank})")
    return wrong


def test_no_package_imports_upward():
    assert upward_imports(REPO_ROOT) == []


def test_an_upward_import_is_caught(tmp_path):
    for package in RANKS:
        (tmp_path / package).mkdir()
    (tmp_path / "models" / "bad.py").write_text("def f():\n    from eval.decoder import DecodeSettings\n")
    (tmp_path / "data_gen" / "also_bad.py").write_text("import eval.metrics\n")
    (tmp_path / "train" / "fine.py").write_text("from eval.decoder import DecodeSettings\nimport models.loading\n")
    (tmp_path / "losses" / "sideways.py").write_text("from models.loading import load_target\n")
    assert upward_imports(tmp_path) == ["models/bad.py:2 imports eval (rank 3 >= models's 1)",
                                        "losses/sideways.py:1 imports models (rank 1 >= losses's 1)",
                                        "data_gen/also_bad.py:1 imports eval (rank 3 >= data_gen's 2)"]
