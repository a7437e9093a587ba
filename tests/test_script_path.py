"""One way to run a file of bench/ or trainer/ by its path: trainer/commands/script_path.py's `run_as_script`.

Python puts a script's folder first on sys.path, where bench/'s and trainer/'s module names (loader, scale, config,
model, ...) would shadow a dependency's. Every script takes its folder off through the helper, before any import
beyond the standard library; no other file of those folders edits sys.path (checked on the syntax tree). Then the
helper on a folder that does shadow a dependency, a real bench script run by path, and the message when the
transrec package is not installed.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from transrec.trainer.commands.script_path import run_as_script

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("bench", "trainer")
HELPER = REPO / "trainer" / "commands" / "script_path.py"
NOT_INSTALLED = "error: transrec is not installed in this Python"


def sources() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (REPO / folder).rglob("*.py"))


def scripts() -> list[Path]:
    """Files run by their path: bench/'s with a `__main__` block, and trainer/'s whose text says how to run them by
    path (`deepspeed trainer/main.py`; the others run as `python -m transrec.trainer.X`)."""
    found = []
    for p in sorted([*(REPO / "bench").glob("*.py"), *(REPO / "trainer").glob("*.py")]):
        text = p.read_text()
        by_path = p.parent.name == "bench" or re.search(rf"(python|deepspeed)\s+trainer/{p.stem}\.py", text)
        if "__name__ == \"__main__\"" in text and by_path:
            found.append(p)
    return found


def sys_path_edits(tree: ast.AST) -> list[int]:
    """Lines that touch sys.path (`sys.path`, `from sys import path`) or add site folders (`site.addsitedir`)."""
    edits = {("sys", "path"), ("site", "addsitedir")}
    attributes = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                  and (n.value.id, n.attr) in edits]
    imports = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               and any((n.module, a.name) in edits for a in n.names)]
    return sorted(set(attributes + imports))


def test_no_file_edits_sys_path_but_the_helper():
    found = {}
    for p in sources():
        if p != HELPER:
            lines = sys_path_edits(ast.parse(p.read_text(), str(p)))
            if lines:
                found[str(p.relative_to(REPO))] = lines
    assert found == {}, (f"sys.path edited outside trainer/commands/script_path.py (use run_as_script(__file__)): "
                         f"{found}")
    assert sys_path_edits(ast.parse(HELPER.read_text())), "the check no longer sees the helper's own edit"


def _is_helper_import(node: ast.stmt) -> bool:
    """`try: from transrec.trainer.commands.script_path import run_as_script` / `except ModuleNotFoundError: raise
    SystemExit(...)`: the import that fails, with the message, when transrec is not installed."""
    if not (isinstance(node, ast.Try) and len(node.body) == 1 and len(node.handlers) == 1):
        return False
    imp, handler = node.body[0], node.handlers[0]
    return (isinstance(imp, ast.ImportFrom) and imp.module == "transrec.trainer.commands.script_path"
            and [a.name for a in imp.names] == ["run_as_script"]
            and isinstance(handler.type, ast.Name) and handler.type.id == "ModuleNotFoundError"
            and isinstance(handler.body[0], ast.Raise) and "SystemExit" in ast.unparse(handler.body[0]))


def _is_helper_call(node: ast.stmt) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func) == "run_as_script"
            and [ast.unparse(a) for a in node.value.args] == ["__file__"])


def first_statements(path: Path) -> str | None:
    """None when `path` runs the helper before importing anything beyond the standard library; else what is wrong."""
    body = ast.parse(path.read_text(), str(path)).body
    imported = False
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            outside = [n for n in names if n != "__future__" and n.split(".")[0] not in sys.stdlib_module_names]
            if outside:
                return f"line {node.lineno} imports {outside} before the script's folder is off sys.path"
        elif _is_helper_import(node):
            imported = True
        elif _is_helper_call(node):
            return None if imported else f"line {node.lineno} calls run_as_script without the guarded import"
        elif isinstance(node, ast.Try):
            return f"line {node.lineno}: a try block other than the helper's guarded import"
    return "no run_as_script(__file__) call at the top level"


def test_scripts_take_their_folder_off_sys_path_first():
    names = [p.relative_to(REPO).as_posix() for p in scripts()]
    assert {"bench/throughput.py", "bench/scale.py", "bench/kernel_bench_common.py", "trainer/main.py"} <= set(names)
    wrong = {name: why for name, p in zip(names, scripts()) if (why := first_statements(REPO / name))}
    assert wrong == {}


def test_the_helper_and_its_message_are_the_same_in_every_script():
    """One message for a missing install (it cannot come from the helper: its import is what fails)."""
    messages = set()
    for p in scripts():
        for node in ast.parse(p.read_text()).body:
            if _is_helper_import(node):
                messages.add(ast.unparse(node.handlers[0].body[0]))
    assert all("not installed" in m and "pip install -e ." in m for m in messages), messages
    assert len(messages) <= 2, messages  # bench's, and trainer/main.py's (which names deepspeed)


def test_the_helper_takes_off_only_the_scripts_folder(tmp_path, monkeypatch):
    folder, other = tmp_path / "scripts", tmp_path / "other"
    folder.mkdir(), other.mkdir()
    monkeypatch.setattr(sys, "path", [str(folder), str(other), *sys.path])
    monkeypatch.chdir(folder)
    sys.path.insert(2, "")  # the working directory, as `python -c` puts it: here the script's folder too
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    run_as_script(str(folder / "probe.py"))
    assert str(folder) not in sys.path and "" not in sys.path and str(other) in sys.path
    assert "HF_HUB_OFFLINE" not in os.environ  # offline only when asked for
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    run_as_script(str(folder / "probe.py"), offline=True)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "0"  # the caller's wins


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


def test_a_script_folder_that_shadows_a_dependency(tmp_path):
    """A folder holding `numpy.py`: run by path, its script gets the real numpy once the helper ran (without it,
    the folder's)."""
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "numpy.py").write_text("raise ImportError('the script folder shadowed numpy')\n")
    helper = ("try:\n    from transrec.trainer.commands.script_path import run_as_script\n"
              "except ModuleNotFoundError:\n    raise SystemExit('not installed') from None\n"
              "run_as_script(__file__)\n")
    probe = "import numpy, sys\nprint(numpy.__file__)\n"
    (folder / "with_helper.py").write_text(helper + probe)
    (folder / "without.py").write_text(probe)
    out = subprocess.run([sys.executable, str(folder / "with_helper.py")], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).parent.name == "numpy" and str(folder) not in out.stdout
    out = subprocess.run([sys.executable, str(folder / "without.py")], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "the script folder shadowed numpy" in out.stderr


PROBE = """import atexit, importlib.util, json, os, sys
from pathlib import Path

def _report():
    names = [p.stem for p in Path(os.environ["PROBE_FOLDER"]).glob("*.py")]
    found = {n: getattr(importlib.util.find_spec(n), "origin", None) for n in names}
    sys_path = [str(Path(p or ".").resolve()) for p in sys.path]
    seen = {"sys_path": sys_path, "found": found, "main": sys.modules["__main__"].__file__}
    Path(os.environ["PROBE_OUT"]).write_text(json.dumps(seen))

atexit.register(_report)
"""


@pytest.mark.parametrize("script", ["bench/scale.py", "bench/throughput.py"])
def test_a_bench_script_run_by_path_leaves_its_folder_off_sys_path(tmp_path, script):
    """`python bench/X.py --help` from the repository root; at exit (a sitecustomize's atexit hook) bench/ is not on
    sys.path and none of its module names (loader, scale, flops, ...) resolves to it."""
    (tmp_path / "sitecustomize.py").write_text(PROBE)
    result = tmp_path / "probe.json"
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=_env(PYTHONPATH=str(tmp_path), PROBE_OUT=str(result), PROBE_FOLDER=str(REPO / "bench")))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
    seen = json.loads(result.read_text())
    assert Path(seen["main"]).resolve() == (REPO / script).resolve()
    assert str(REPO / "bench") not in seen["sys_path"]
    assert "loader" in seen["found"] and "scale" in seen["found"]
    shadowing = {n: o for n, o in seen["found"].items() if o and Path(o).resolve().parent == REPO / "bench"}
    assert shadowing == {}


def test_without_the_package_a_script_says_how_to_install_it():
    """`python -S`: no site-packages, so no transrec; the script stops at the helper's import with the message."""
    out = subprocess.run([sys.executable, "-S", "bench/scale.py", "--help"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().startswith(NOT_INSTALLED) and "Traceback" not in out.stderr
