"""dvc.yaml's deps are complete: a stage whose code changes reruns.

For each stage, the script of its `cmd` (`python stages/X.py ...`) is walked with `ast` for every module of this
repository it imports, transitively: `import a.b`, `from a.b import c` (c may be a submodule), the stage-local
`_common` / `_cli`, relative imports, and imports inside functions (they run too: lazy imports are still code
the stage executes). Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py`, so those count. The package's
data files (e.g. `plca/data/sources.yaml`) count when a module of the closure names them. Every file of that
closure must lie under a dep of the stage, and every code dep must hold something the closure imports.
"""

from __future__ import annotations

import ast
import copy
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
#: Importable top-level packages of this repository (installed from the repository root).
PACKAGES = ("plca",)
#: Where stage scripts live: `python stages/X.py` puts this folder first on sys.path for the whole process.
STAGES = "stages"
#: Deps under these folders are code; everything else (data, models, metrics, logs, eval) is not checked here.
CODE_ROOTS = (*PACKAGES, STAGES)
_SCRIPT = re.compile(r"\bpython3?\s+(\S+\.py)\b")


# ---- the import closure ------------------------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, at any depth (function bodies included), except `if TYPE_CHECKING:` bodies: those never run."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _string_constants(tree: ast.AST) -> set[str]:
    """String literals that are values (docstrings and other bare string statements are not)."""
    bare = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare}


@dataclass
class Closure:
    """Repository files a script runs or reads, each with the import chain (script first) that pulls it in."""

    chains: dict[str, list[str]]

    def __contains__(self, rel: str) -> bool:
        return rel in self.chains

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.chains))


class ImportWalker:
    """Resolve imports to files of one repository, as Python would for `python <script>` run from its root."""

    def __init__(self, root: Path, packages: Iterable[str] = PACKAGES) -> None:
        self.root = root.resolve()
        self.packages = tuple(packages)
        self._closures: dict[Path, Closure] = {}  # files do not change during a test session

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _module_files(self, dotted: str, script_dir: Path) -> list[Path] | None:
        """Files that `import dotted` runs (package __init__.py files on the way, then the module); None when the
        name is not a module of this repository (the standard library, site-packages) or does not exist."""
        parts = dotted.split(".")
        if (script_dir / f"{parts[0]}.py").is_file() and len(parts) == 1:
            return [script_dir / f"{parts[0]}.py"]
        if parts[0] not in self.packages:
            return None
        files, here = [], self.root
        for i, part in enumerate(parts):
            here = here / part
            if (here / "__init__.py").is_file():
                files.append(here / "__init__.py")
            elif i == len(parts) - 1 and here.with_suffix(".py").is_file():
                files.append(here.with_suffix(".py"))
            else:
                return None
        return files

    def _package_of(self, path: Path) -> str | None:
        """Dotted package a repository file belongs to (itself for an __init__.py); None outside the packages."""
        rel = path.relative_to(self.root).with_suffix("")
        if not rel.parts or rel.parts[0] not in self.packages:
            return None
        parts = rel.parts[:-1]
        return ".".join(parts)

    def imports(self, path: Path, script_dir: Path) -> list[Path]:
        """Repository files that running `path` imports directly."""
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found: list[Path] = []
        for node in _runtime_nodes(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found += self._module_files(alias.name, script_dir) or []
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = self._package_of(path)
                    if package is None:
                        raise AssertionError(f"{self.rel(path)}: relative import outside a package")
                    parts = package.split(".")
                    base_parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*base_parts, node.module] if node.module else base_parts)
                else:
                    base = node.module or ""
                files = self._module_files(base, script_dir)
                if files is None:
                    continue
                found += files
                for alias in node.names:  # `from a.b import c`: c is a submodule or a name of a/b/__init__.py
                    if alias.name != "*":
                        found += (self._module_files(f"{base}.{alias.name}", script_dir) or [])[-1:]
        return found

    def data_files(self) -> list[Path]:
        """Non-Python files shipped inside the packages (package data such as plca/data/sources.yaml)."""
        return sorted(p for package in self.packages for p in (self.root / package).rglob("*")
                      if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)

    def closure(self, script: Path) -> Closure:
        """Every repository file `python script` imports (transitively) or reads as package data."""
        script = script.resolve()
        if script not in self._closures:
            self._closures[script] = self._closure(script)
        return self._closures[script]

    def _closure(self, script: Path) -> Closure:
        chains = {self.rel(script): [self.rel(script)]}
        todo = deque([script])  # breadth first: each file's chain is a shortest one
        while todo:
            path = todo.popleft()
            for dep in self.imports(path, script.parent):
                rel = self.rel(dep)
                if rel not in chains:
                    chains[rel] = [*chains[self.rel(path)], rel]
                    todo.append(dep)
        data = self.data_files()
        for rel in sorted(chains):
            if not rel.endswith(".py"):
                continue
            strings = _string_constants(ast.parse((self.root / rel).read_text(encoding="utf-8")))
            for file in data:
                name = self.rel(file)
                if name not in chains and any(file.name in s for s in strings):
                    chains[name] = [*chains[rel], name]
        return Closure(chains)


# ---- dvc.yaml ----------------------------------------------------------------------------------------------


def stage_script(name: str, stage: Mapping[str, Any]) -> str:
    cmd = stage["cmd"]
    cmd = " ".join(cmd) if isinstance(cmd, list) else cmd
    match = _SCRIPT.search(cmd)
    if match is None:
        raise AssertionError(f"stage {name!r}: no `python <script>.py` in its cmd {cmd!r}")
    return match.group(1)


def code_deps(stage: Mapping[str, Any]) -> list[str]:
    """The stage's deps under plca/ or stages/. Interpolated ones (`${data.root}`, `models/...s${item.seed}`) are
    data and models; a code dep is a literal path, or this test could not check it."""
    deps = [d for d in stage.get("deps") or [] if isinstance(d, str) and "${" not in d]
    return [d.rstrip("/") for d in deps if d.split("/")[0] in CODE_ROOTS]


def covered(rel: str, deps: Iterable[str]) -> bool:
    return any(rel == d or rel.startswith(d + "/") for d in deps)


def dep_problems(dvc: Mapping[str, Any], walker: ImportWalker | None = None) -> list[str]:
    """Human-readable problems of every stage: closure files no dep covers, and code deps the closure never uses."""
    walker = walker or _REPO_WALKER
    problems = []
    for name, raw in dvc["stages"].items():
        stage = raw.get("do", raw)  # `foreach` stages keep the definition under `do`
        script = stage_script(name, stage)
        closure = walker.closure(walker.root / script)
        deps = code_deps(stage)
        for rel in closure:
            if not covered(rel, deps):
                chain = " -> ".join(closure.chains[rel])
                problems.append(f"stage {name!r}: {rel} is not covered by any dep (pulled in by {chain})")
        # Stale deps, the other direction: a dep that nothing the stage runs lies under only reruns the stage for
        # nothing. A folder dep passes when it holds at least one closure file: the folder is the intended
        # granularity (a module added to it later is covered without touching dvc.yaml), even where the stage
        # imports only part of it.
        for dep in deps:
            if not any(covered(rel, [dep]) for rel in closure):
                what = "folder" if (walker.root / dep).is_dir() else "file"
                problems.append(f"stage {name!r}: {what} dep {dep} holds nothing {script} imports or reads (stale)")
    return problems


_REPO_WALKER = ImportWalker(REPO)


def load_dvc_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))


# ---- the tests -----------------------------------------------------------------------------------------------


def test_every_stage_depends_on_all_the_code_it_runs_and_nothing_stale() -> None:
    problems = dep_problems(load_dvc_yaml())
    assert not problems, "dvc.yaml deps are out of date:\n" + "\n".join(problems)


def test_the_check_fails_when_a_dep_is_removed() -> None:
    dvc = load_dvc_yaml()
    assert not dep_problems(dvc)
    broken = copy.deepcopy(dvc)
    broken["stages"]["evaluate"]["do"]["deps"].remove("plca/losses")
    problems = dep_problems(broken)
    assert problems and all(p.startswith("stage 'evaluate': plca/losses/") for p in problems), problems
    chain = next(p for p in problems if "plca/losses/association.py " in p)
    assert "(pulled in by stages/evaluate.py -> " in chain and chain.endswith(" -> plca/losses/association.py)")

    # adapt and oracle alias train_source's list: one removal there is missing in all three
    broken = copy.deepcopy(dvc)
    broken["stages"]["train_source"]["do"]["deps"].remove("plca/evaluation")
    problems = dep_problems(broken)
    assert {p.split(":")[0] for p in problems} == {"stage 'train_source'", "stage 'adapt'", "stage 'oracle'"}
    assert "stage 'adapt': plca/evaluation/inference.py is not covered by any dep (pulled in by stages/train.py -> " \
           "plca/experiment.py -> plca/evaluation/inference.py)" in problems

    broken = copy.deepcopy(dvc)
    broken["stages"]["prepare"]["deps"].remove("stages/_cli.py")
    assert dep_problems(broken) == [
        "stage 'prepare': stages/_cli.py is not covered by any dep (pulled in by stages/prepare.py -> stages/_cli.py)"]

    # the folder dep plca/data replaced by its modules alone: the package data file it reads is missing
    broken = copy.deepcopy(dvc)
    broken["stages"]["prepare"]["deps"].remove("plca/data")
    broken["stages"]["prepare"]["deps"] += [p.relative_to(REPO).as_posix() for p in (REPO / "plca/data").glob("*.py")]
    (problem,) = dep_problems(broken)
    assert problem.startswith("stage 'prepare': plca/data/sources.yaml is not covered")
    assert problem.endswith(" -> plca/data/download.py -> plca/data/sources.yaml)")


def test_the_check_reports_stale_deps() -> None:
    dvc = load_dvc_yaml()
    dvc["stages"]["report"]["deps"] += ["plca/score.py", "plca/bench.py"]
    problems = dep_problems(dvc)
    assert problems == [
        "stage 'report': file dep plca/score.py holds nothing stages/report.py imports or reads (stale)",
        "stage 'report': file dep plca/bench.py holds nothing stages/report.py imports or reads (stale)",
    ]


def write(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_walker_resolves_every_kind_of_import(tmp_path: Path) -> None:
    write(tmp_path, {
        "stages/run.py": "import os\nimport _local\nfrom pkg.a import helper\n",
        "stages/_local.py": "def f():\n    import pkg.lazy.deep as d\n    return d\n",
        "stages/unused.py": "",
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "from .b import x\nfrom . import c\n",
        "pkg/a/b.py": "x = 1\nfrom ..shared import y\n",
        "pkg/a/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.typing_only\n",
        "pkg/a/helper.py": "NAME = 'table.yaml'\n",
        "pkg/a/table.yaml": "a: 1\n",
        "pkg/a/other.yaml": "b: 2\n",  # named in a docstring only
        "pkg/shared.py": '"""other.yaml is mentioned here, not read"""\n',
        "pkg/lazy/__init__.py": "",
        "pkg/lazy/deep.py": "import numpy\n",
        "pkg/typing_only.py": "",
        "pkg/never.py": "",
    })
    closure = ImportWalker(tmp_path, packages=("pkg",)).closure(tmp_path / "stages/run.py")
    assert list(closure) == sorted([
        "stages/run.py", "stages/_local.py", "pkg/__init__.py", "pkg/a/__init__.py", "pkg/a/b.py", "pkg/a/c.py",
        "pkg/a/helper.py", "pkg/a/table.yaml", "pkg/shared.py", "pkg/lazy/__init__.py", "pkg/lazy/deep.py",
    ])
    assert closure.chains["pkg/lazy/deep.py"] == ["stages/run.py", "stages/_local.py", "pkg/lazy/deep.py"]
    assert closure.chains["pkg/shared.py"] == ["stages/run.py", "pkg/a/__init__.py", "pkg/a/b.py", "pkg/shared.py"]
    assert closure.chains["pkg/a/table.yaml"][-2:] == ["pkg/a/helper.py", "pkg/a/table.yaml"]


@pytest.mark.parametrize("stage", sorted(load_dvc_yaml()["stages"]))
def test_each_stage_script_exists(stage: str) -> None:
    raw = load_dvc_yaml()["stages"][stage]
    assert (REPO / stage_script(stage, raw.get("do", raw))).is_file()


def test_the_readme_pipeline_picture_names_every_stage_family() -> None:
    """The README's picture of `dvc repro` (its stage families) stays in sync with dvc.yaml."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## What `dvc repro` does", 1)[1].split("```", 2)[1]
    drawn = set(re.findall(r"[a-z_]+", section))
    missing = sorted(set(load_dvc_yaml()["stages"]) - drawn)
    assert not missing, f"README.md's pipeline picture lacks the stage families {missing}"



def _param_deps(stage: Mapping[str, Any]) -> list[str]:
    """The params keys a stage (or a foreach stage's `do`) lists."""
    names: list[str] = []
    for p in stage.get("do", stage).get("params", []):
        names.extend([p] if isinstance(p, str) else [k for keys in p.values() for k in keys])  # `- f.yaml: [k]`
    return names


def _prepare_keys(keys: Iterable[str]) -> list[str]:
    return [k for k in keys if k in ("data", "data.prepare", "data.embedded")
            or k.startswith(("data.prepare.", "data.embedded."))]


def test_only_prepare_depends_on_how_the_data_are_prepared() -> None:
    """Issue 21, item 7: training and evaluation stages depended on the whole `data` section, so changing
    `data.prepare.download.fetch.retries` retrained everything. A stage now lists only the data params it reads;
    how the data were prepared reaches the others through the prepared files."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert len(stages) > 5 and all(_param_deps(s) for n, s in stages.items() if n != "report")
    offending = {name: _prepare_keys(_param_deps(s)) for name, s in stages.items() if name != "prepare"}
    assert {name: keys for name, keys in offending.items() if keys} == {}
    assert {"data.prepare", "data.embedded"} <= set(_param_deps(stages["prepare"]))
