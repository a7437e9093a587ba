"""trainer/main.py is the training command (`deepspeed trainer/main.py`), not a library: no module of the package
imports it, function-local imports included (an AST walk over every file). Config reading lives beside config
writing in trainer/core/config.py (from_dict, read_run_config) and shard URLs are localised by data_shards/remote.py."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "data_shards", "kernels")
ENTRY = "transrec.trainer.main"
# still launching runs through the command's main(argv) (issue: the runner is to call the core's train(cfg))
STILL_IMPORTING: set[str] = set()


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-local imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_module_imports_the_training_command():
    importers = {str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
                 if p.name != "main.py" or p.parent.name != "trainer"
                 if ENTRY in imports_of(p)}
    assert importers == STILL_IMPORTING, f"modules importing {ENTRY}: {sorted(importers)}"


def test_the_ast_walk_sees_function_local_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from transrec.trainer.main import local_shards\n    return local_shards\n")
    assert ENTRY in imports_of(f)


def test_config_reads_what_it_writes():
    from transrec.trainer.core.config_records import from_dict, to_dict
    from transrec.trainer.core.overrides import apply_overrides
    from transrec.trainer.core.presets import preset

    cfg = apply_overrides(preset("cpu-small"), ["stage1.popularity_correction=0.5", "transfer.candidates=start,prior",
                                                "eval.ks=5,10", "model.d=128"])
    assert from_dict(to_dict(cfg)) == cfg
