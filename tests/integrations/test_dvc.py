"""dvc.yaml is never stale: each stage's deps are exactly the modules its command can run, its params
the keys it reads; an edit makes `dvc status` report the stages that run it; dvc.lock records a
pipeline run only when it ran with params/*.yaml as they are; a DVC failure quotes DVC's own error.

The import closure of a stage (`cmd: freezeflow <command>`): the functions the command runs in
freezeflow.app.cli and freezeflow.app.steps (walked call by call: those two modules serve every
stage), every freezeflow module they import (at module level or inside those functions), then
everything those modules import anywhere (grimp), and the package __init__s above them all.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from functools import lru_cache
from pathlib import Path

import grimp
import pytest
import yaml

from freezeflow.core.errors import UserError
from freezeflow.core.params import FILES
from tests.conftest import BIN, REPO, run

WALKED = ("freezeflow.app.cli", "freezeflow.app.steps")
ALWAYS_RUN = ("main", "main_options")  # the console script's entry and the app's callback
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = sorted(DVC_YAML["stages"])
FROZEN = {name for name, stage in DVC_YAML["stages"].items() if stage.get("frozen")}
# data.yaml keys that no stage reads (ingest alone: `freezeflow ingest` is not a stage)
UNREAD_DATA = {"imbalance_warn"}
DATA_READ = tuple(f.name for f in dataclasses.fields(FILES["data"]) if f.name not in UNREAD_DATA)
ALL = None  # a params file listed without keys: DVC tracks every key in it
STAGE_PARAMS = {
    "prepare": {"params/data.yaml": DATA_READ},
    # train.use_best overlays params/best.yaml; train opens prepared/ by the data keys (re-preparing on a miss)
    # serve.yaml: how the run's MLflow model is logged (runtime, top_k, batch size, max_pixels)
    "train": {"params/data.yaml": DATA_READ, "params/train.yaml": ALL, "params/best.yaml": ALL,
              "params/serve.yaml": ALL},
    # the trials train with train.yaml (each overriding what the search space varies)
    "tune": {"params/data.yaml": DATA_READ, "params/train.yaml": ALL, "params/tune.yaml": ALL},
    "evaluate": {"params/data.yaml": DATA_READ, "params/evaluate.yaml": ALL},
}


def module_file(module: str) -> Path:
    path = REPO.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


@lru_cache(maxsize=None)
def parse(module: str) -> ast.Module:
    return ast.parse(module_file(module).read_text())


def top_functions(module: str) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in parse(module).body if isinstance(node, ast.FunctionDef)}


def imports_in(nodes: list[ast.AST]):
    """(module, imported name or None) of every absolute import inside `nodes`."""
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                yield from ((alias.name, None) for alias in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
                yield from ((sub.module, alias.name) for alias in sub.names)


def walk_function(module: str, name: str, walked: set, reached: set) -> None:
    """Follow `module.name`: its imports, the same-module functions it calls, and the functions it
    imports from the walked modules; every other freezeflow module it imports goes to `reached`."""
    if (module, name) in walked:
        return
    walked.add((module, name))
    functions = top_functions(module)
    body = [node for node in parse(module).body if isinstance(node, (ast.Import, ast.ImportFrom))]
    for imported, member in imports_in([*body, functions[name]]):
        if imported in WALKED and member in top_functions(imported):
            walk_function(imported, member, walked, reached)
        elif imported.startswith("freezeflow"):
            reached.add(imported)
    calls = {node.func.id for node in ast.walk(functions[name])
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    for called in sorted(calls & set(functions)):
        walk_function(module, called, walked, reached)


def command_function(cmd: str) -> str:
    """`freezeflow lr-find` -> lr_find: the typer command's function in freezeflow.app.cli."""
    from freezeflow.app.cli import app

    command = cmd.split()[1]
    names = {(c.name or c.callback.__name__.replace("_", "-")): c.callback.__name__ for c in app.registered_commands}
    return names[command]


@lru_cache(maxsize=None)
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("freezeflow")


@lru_cache(maxsize=None)
def stage_code(stage: str) -> tuple[frozenset, frozenset]:
    """(modules, walked (module, function) pairs) that `freezeflow <command>` of `stage` can run."""
    assert DVC_YAML["stages"][stage]["cmd"].startswith("freezeflow "), "a stage runs the freezeflow CLI"
    walked: set = set()
    reached = {WALKED[0]}
    for name in (command_function(DVC_YAML["stages"][stage]["cmd"]), *ALWAYS_RUN):
        walk_function(WALKED[0], name, walked, reached)
    reached |= {module for module, _ in walked}
    todo, modules = sorted(reached), set()
    while todo:
        module = todo.pop()
        if module in modules:
            continue
        modules.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b
        if module not in WALKED:
            todo += sorted(graph().find_upstream_modules(module))
    return frozenset(modules), frozenset(walked)


def closure_files(stage: str) -> set[str]:
    return {module_file(m).relative_to(REPO).as_posix() for m in stage_code(stage)[0]}


def code_deps(stage: str) -> list[str]:
    return [dep for dep in DVC_YAML["stages"][stage]["deps"] if dep.split("/")[0] == "freezeflow"]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_cover_every_module_its_command_runs(stage):
    missing = sorted(path for path in closure_files(stage) if not covered(path, code_deps(stage)))
    assert not missing, f"dvc.yaml: stage {stage} runs these modules; add them to its deps: {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_name_no_module_its_command_does_not_run(stage):
    """Exact: a file dep is in the closure; a folder dep only when every module under it is."""
    closure = closure_files(stage)
    extra = []
    for dep in code_deps(stage):
        path = REPO / dep
        files = [p.relative_to(REPO).as_posix() for p in sorted(path.rglob("*.py"))] if path.is_dir() else [dep]
        assert files and path.exists(), f"dvc.yaml: stage {stage}: dep {dep} does not exist"
        extra += [f"{dep}: {f}" for f in files if f not in closure]
    assert not extra, f"dvc.yaml: stage {stage} never runs these (list the folder's other files instead): {extra}"


def test_the_closure_follows_lazy_imports_and_stops_at_other_commands():
    prepare, train = closure_files("prepare"), closure_files("train")
    assert "freezeflow/core/data/prepare.py" in prepare  # imported inside steps.prepare_step
    assert "freezeflow/core/train/loop.py" in train and "freezeflow/core/train/loop.py" not in prepare
    assert "freezeflow/integrations/tracking.py" in train and "freezeflow/integrations/tracking.py" not in prepare
    for stage in STAGES:  # other commands' modules: ingest, data digits, the servers, the report
        for path in ("freezeflow/app/photosets.py", "freezeflow/app/sample_data.py",
                     "freezeflow/integrations/servers.py", "freezeflow/integrations/report.py"):
            assert path not in closure_files(stage), (stage, path)


def listed_params(stage: str) -> dict[str, tuple | None]:
    out = {}
    for entry in DVC_YAML["stages"][stage].get("params", []):
        for file, keys in entry.items():
            out[file] = tuple(keys) if keys is not None else ALL
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_stage_params_exist_in_the_params_files(stage):
    for file, keys in listed_params(stage).items():
        assert (REPO / file).exists(), f"dvc.yaml: stage {stage}: {file} does not exist"
        on_disk = yaml.safe_load((REPO / file).read_text()) or {}
        fields = {f.name for f in dataclasses.fields(FILES[Path(file).stem])} if Path(file).stem in FILES else None
        for key in keys or ():
            assert key in on_disk, f"dvc.yaml: stage {stage}: {file} has no key {key}"
            assert fields is None or key in fields, f"dvc.yaml: stage {stage}: {key} is no field of {file}"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_params_are_the_keys_its_step_reads(stage):
    assert listed_params(stage) == STAGE_PARAMS[stage]


@pytest.mark.parametrize("stage", STAGES)
def test_a_data_key_left_out_is_read_by_no_code_the_stage_runs(stage):
    """UNREAD_DATA is honest: no module of the stage's closure reads it (in cli and steps: no
    function the stage runs)."""
    modules, walked = stage_code(stage)
    nodes = [parse(m) for m in modules if m not in WALKED]
    nodes += [top_functions(module)[name] for module, name in walked]
    read = {node.attr for tree in nodes for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not read & UNREAD_DATA, f"stage {stage} reads {read & UNREAD_DATA}: list it under params/data.yaml"


def dvc_status(root: Path, env: dict) -> dict[str, list]:
    """`dvc status --json`: stage name -> what changed ({} when dvc.lock matches the workspace)."""
    out = json.loads(run([str(BIN / "dvc"), "status", "--json"], root, env).stdout or "{}")
    return {name.split(":")[-1]: changes for name, changes in out.items()}


def fake_outputs(root: Path) -> None:
    """Every stage's outs, so that dvc.lock can be recorded without training (tune's are committed)."""
    for folder in ("prepared", "models"):
        (root / folder).mkdir(exist_ok=True)
        (root / folder / "placeholder").write_text(folder)
    for name in ("metrics.json", "history.json", "eval.json"):
        (root / "reports" / name).write_text("{}")


@pytest.fixture
def locked_project(dvc_project):
    """dvc_project with the repo's .dvcignore, placeholder outputs and dvc.lock recorded as the
    pipeline records it."""
    from freezeflow.app.steps import record_dvc_lock

    root, env = dvc_project
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    fake_outputs(root)
    line = record_dvc_lock(root, root / "params", [], ["prepare", "train", "evaluate"])
    assert line == "dvc.lock updated: prepare, train, evaluate (and frozen tune)"
    assert dvc_status(root, env) == {}
    return root, env


EDITED = ("freezeflow/core/data/images.py", "freezeflow/core/train/loop.py", "freezeflow/integrations/tracking.py",
          "freezeflow/app/cli.py", "freezeflow/integrations/tune.py", "freezeflow/app/photosets.py")


def test_editing_a_module_makes_dvc_status_report_the_stages_that_run_it(locked_project):
    root, env = locked_project
    reported = {}
    for module in EDITED:  # one at a time, restored after: the same bytes are no change to DVC
        target = root / module
        original = target.read_text()
        target.write_text(original + "# an edit\n")
        reported[module] = set(dvc_status(root, env))
        target.write_text(original)
    expected = {module: {stage for stage in STAGES if module in closure_files(stage)} - FROZEN  # deps unchecked
                for module in EDITED}
    assert reported == expected
    assert reported["freezeflow/core/data/images.py"] == {"prepare", "train", "evaluate"}
    assert reported["freezeflow/app/photosets.py"] == set()
    assert dvc_status(root, env) == {}


def test_overrides_leave_dvc_lock_alone_and_params_as_on_disk_record_it(locked_project):
    from freezeflow.app.steps import record_dvc_lock

    root, env = locked_project
    lock = (root / "dvc.lock").read_bytes()
    (root / "reports" / "eval.json").write_text('{"accuracy": 1.0}')  # a new run's output
    line = record_dvc_lock(root, root / "params", ["data.image_size=48"], ["prepare", "train", "evaluate"])
    assert line.startswith("dvc.lock not updated: run with -S overrides (data.image_size=48); params/*.yaml stay")
    assert (root / "dvc.lock").read_bytes() == lock
    assert "evaluate" in dvc_status(root, env)  # honest: the lock does not claim the overridden run
    # an override that changes no value (params/data.yaml has image_size 32) runs what dvc.yaml reads
    line = record_dvc_lock(root, root / "params", ["data.image_size=32"], ["prepare", "train", "evaluate"])
    assert line.startswith("dvc.lock updated") and dvc_status(root, env) == {}


def test_data_that_changed_during_the_run_is_not_recorded(locked_project):
    from freezeflow.app.steps import check_data, record_dvc_lock
    from freezeflow.core.params import load_params

    root, env = locked_project
    lock = (root / "dvc.lock").read_bytes()
    at_start = check_data(load_params(root / "params"), root)
    image = sorted((root / "data" / "shapes" / "class_0").iterdir())[0]
    image.write_bytes(image.read_bytes() + b"\0")  # e.g. an ingest while the flow trained
    line = record_dvc_lock(root, root / "params", [], ["prepare", "train", "evaluate"], at_start)
    assert line.startswith("dvc.lock not updated: data/shapes changed during the run")
    assert (root / "dvc.lock").read_bytes() == lock


def test_a_dvc_failure_quotes_dvcs_own_error_line(dvc_project):
    """The lock records data/digits (params/data.yaml), absent here: DVC's reason, not 'no output'."""
    from freezeflow.integrations.dvc import commit_stages

    root, _ = dvc_project
    fake_outputs(root)
    data = yaml.safe_load((root / "params" / "data.yaml").read_text())
    (root / "params" / "data.yaml").write_text(yaml.safe_dump({**data, "dir": "data/digits"}, sort_keys=False))
    with pytest.raises(UserError) as caught:
        commit_stages(root, ["prepare"])
    message = str(caught.value)
    assert message.startswith("dvc commit -f prepare failed: ERROR: failed to commit")
    assert message.endswith("dependency 'data/digits' does not exist") and "\n" not in message


def test_error_line_is_dvcs_error_without_warnings_footer_or_passwords():
    from freezeflow.integrations.dvc import dvc_error_line

    text = ("WARNING: stage: 'tune' is frozen.\nERROR: failed to push - https://u:pw@host/r: 401\n\n"
            "Having any troubles? Hit us up at https://dvc.org/support, we are always happy to help!\n")
    assert dvc_error_line(text, 1) == "ERROR: failed to push - https://u:***@host/r: 401"
    assert dvc_error_line("WARNING: x\nsomething broke\n", 1) == "something broke"
    assert dvc_error_line("  \n", 255) == "exit code 255 and no output"


def test_dvcignore_keeps_bytecode_out_of_folder_deps(locked_project):
    """Running the code writes __pycache__ into the folders stages depend on: never a change."""
    root, env = locked_project
    cache = root / "freezeflow" / "core" / "models" / "__pycache__"
    cache.mkdir()
    (cache / "io.cpython-311.pyc").write_bytes(b"\0" * 16)
    assert dvc_status(root, env) == {}
    shutil.rmtree(cache)
