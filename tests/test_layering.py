"""The source tree reads as the architecture, and its imports keep it so (read from the code itself with ast,
imports inside functions included):

- Each folder (or module) has a rank and imports only itself and lower ranks: infra/ (run directories, tracking,
  process groups), then models/ and losses/, then data_gen/, then eval/ (which reads data_gen's records and chat
  templates), then the training machinery train/core/, then the stages that read eval's output or train
  (train/pretrain.py, train/distill.py, train/online/, export/), then the orchestration above every stage (train/pipeline/: the stage table,
  the runner, preflight, sweeps), then the commands (train/run.py, slurm/), bench/ and tests/ on top. A Python file
  in a folder with no rank fails the test, so a new folder must be placed.
- Stages are leaves: nothing a stage's module imports, directly or through other modules, is another stage's module
  (the stages are those of the stage table, `train/pipeline/stages.py`). What two stages share lives in the
  machinery below them."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT
from train.pipeline.stages import STAGES

# A unit (a package or a module, by dotted path; the longest matching prefix wins) may import itself and any unit of
# a lower rank; never another unit of its own rank or above.
RANKS = {"infra": 0, "models": 1, "losses": 1, "data_gen": 2, "eval": 3, "train.core": 4, "train.pretrain": 5,
         "train.distill": 5, "train.online": 5, "export": 5, "train.pipeline": 6, "train.run": 7, "slurm": 7, "bench": 8,
         "tests": 9}
TOP = {unit.split(".")[0] for unit in RANKS}
# Where a stage lives: its module, or its package when it has one of its own (train/online/, export/).
STAGE_HOMES = {name: stage.home for name, stage in STAGES.items()}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str, ranks: dict = RANKS) -> str | None:
    matches = [unit for unit in ranks if module == unit or module.startswith(unit + ".")]
    return max(matches, key=len) if matches else None


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import of one of our packages in a file (`from a import b` gives a.b too, in
    case b is a module)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in TOP]
    return found


def source_files(root: Path) -> dict[str, Path]:
    """Every Python file of our folders by module name (empty package markers left out)."""
    return {module_name(root, path): path for top in sorted(TOP) if (root / top).is_dir()
            for path in sorted((root / top).rglob("*.py")) if path.read_text().strip()}


def wrong_imports(root: Path, ranks: dict = RANKS) -> list[str]:
    wrong = []
    for module, path in source_files(root).items():
        unit = unit_of(module, ranks)
        if unit is None:
            wrong.append(f"{path.relative_to(root)} is in no ranked folder: add it to tests/test_layering.py's RANKS")
            continue
        reported = set()
        for line, imported in imports(path):
            other = unit_of(imported, ranks)
            if other is not None and other != unit and ranks[other] >= ranks[unit] and (line, other) not in reported:
                reported.add((line, other))  # once per import statement and unit
                wrong.append(f"{path.relative_to(root)}:{line} imports {imported} "
                             f"({other}, rank {ranks[other]} >= {unit}'s {ranks[unit]})")
    return sorted(set(wrong))


def stage_to_stage(root: Path, homes: dict = STAGE_HOMES) -> list[str]:
    """Every chain of imports from one stage's home to another's."""
    files = source_files(root)
    graph = {module: {name for _, name in imports(path) if name in files} for module, path in files.items()}

    def home_of(module: str) -> str | None:
        return next((s for s, home in homes.items() if module == home or module.startswith(home + ".")), None)

    found = []
    for stage, home in homes.items():
        starts = [m for m in files if home_of(m) == stage]
        seen, frontier = {m: [m] for m in starts}, list(starts)
        while frontier:
            module = frontier.pop()
            for imported in sorted(graph[module]):
                if imported in seen:
                    continue
                seen[imported] = seen[module] + [imported]
                other = home_of(imported)
                if other is not None and other != stage:
                    found.append(f"stage {stage} imports stage {other}: {' -> '.join(seen[imported])}")
                else:
                    frontier.append(imported)
    return sorted(found)


def test_no_unit_imports_its_own_rank_or_above():
    assert wrong_imports(REPO_ROOT) == []


def test_stages_are_leaves():
    assert stage_to_stage(REPO_ROOT) == []


def test_every_stage_of_the_table_has_a_home_in_the_tree():
    files = source_files(REPO_ROOT)
    assert all(stage.module in files for stage in STAGES.values())
    assert {unit_of(home) for home in STAGE_HOMES.values()} <= set(RANKS)


def test_an_upward_import_is_caught(tmp_path):
    for package in TOP:
        (tmp_path / package).mkdir()
    (tmp_path / "train" / "core").mkdir()
    (tmp_path / "models" / "bad.py").write_text("def f():\n    from eval.decoder import DecodeSettings\n")
    (tmp_path / "data_gen" / "also_bad.py").write_text("import eval.metrics\n")
    (tmp_path / "train" / "distill.py").write_text("from eval.decoder import DecodeSettings\nimport models.loading\n")
    (tmp_path / "losses" / "sideways.py").write_text("from models.loading import load_target\n")
    (tmp_path / "train" / "core" / "machinery.py").write_text("from train.distill import DistillSettings\n")
    (tmp_path / "train" / "newfolder").mkdir()
    (tmp_path / "train" / "newfolder" / "x.py").write_text("import infra.settings\n")
    assert wrong_imports(tmp_path) == [
        "data_gen/also_bad.py:1 imports eval.metrics (eval, rank 3 >= data_gen's 2)",
        "losses/sideways.py:1 imports models.loading (models, rank 1 >= losses's 1)",
        "models/bad.py:2 imports eval.decoder (eval, rank 3 >= models's 1)",
        "train/core/machinery.py:1 imports train.distill (train.distill, rank 5 >= train.core's 4)",
        "train/newfolder/x.py is in no ranked folder: add it to tests/test_layering.py's RANKS"]


def test_a_stage_importing_another_stage_is_caught_directly_and_through_machinery(tmp_path):
    for folder in ("eval", "train/online", "train/core", "data_gen", "models"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "eval" / "speculative.py").write_text("import eval.decoder\n")
    (tmp_path / "eval" / "decoder.py").write_text("X = 1\n")
    (tmp_path / "train" / "online" / "stage.py").write_text("from train.online.arms import ArmState\n")
    (tmp_path / "train" / "online" / "arms.py").write_text("def f():\n    from eval.speculative import aggregate\n")
    (tmp_path / "train" / "distill.py").write_text("from train.core.rows import Row\n")
    (tmp_path / "train" / "core" / "rows.py").write_text("from data_gen.generate import human_bytes\n")
    (tmp_path / "data_gen" / "generate.py").write_text("X = 1\n")
    (tmp_path / "models" / "export.py").write_text("from models.kinds import kind_of\n")
    (tmp_path / "models" / "kinds.py").write_text("X = 1\n")
    assert stage_to_stage(tmp_path) == [
        "stage distill imports stage data_gen: train.distill -> train.core.rows -> data_gen.generate",
        "stage online imports stage eval: train.online.arms -> eval.speculative"]
