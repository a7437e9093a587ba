"""Settings are typed values inside the package (docs/layout.md): no library, serving or experiments module writes or
parses a `section.key=value` string. The command line's `--set` parser (core/overrides.py: `apply_overrides`) is the one
place that reads them; presets, experiment plans and transfer candidates are functions over `RunConfig`.

A string counts as a setting when it starts with `name=` or `section.name=` (a literal, or an f-string's leading
text); the text of an exception (`raise ...`), which names a setting and its bad value for the user, a command-line
option's `metavar` and `help`, and docstrings are not settings. Parsing is a `.split("=")`, `.partition("=")` or
`.rpartition("=")` call.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from test_layers import LIBRARY, layer, package_files

SETTING = re.compile(r"^(?:[a-z][a-z0-9_]*\.)*[a-z][a-z0-9_]*=")
# (module, function): the command line's parser of `--set section.key=value`
PARSERS = {("transrec.trainer.core.overrides", "apply_overrides")}
CHECKED = (*LIBRARY, "serving", "experiments")


def docstring_ids(tree: ast.AST) -> set[int]:
    return {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def setting_strings(module: str, source: str, where: str) -> list[str]:
    """`where:line` of each setting string written and each `=` split, outside PARSERS, raises and docstrings."""
    tree = ast.parse(source)
    skip, bad = docstring_ids(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in ("metavar", "help"):  # a command-line option's text
            skip.update(id(n) for n in ast.walk(node))
        if isinstance(node, ast.Raise) or (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                                           and (module, node.name) in PARSERS):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
            first = node.values[0] if node.values else None
            text = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else ""
            if SETTING.match(text):
                bad.append(f"{where}:{node.lineno} writes a setting string: {text!r}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SETTING.match(node.value):
            bad.append(f"{where}:{node.lineno} writes a setting string: {node.value[:40]!r}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("split", "partition", "rpartition") and node.args \
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == "=":
            bad.append(f"{where}:{node.lineno} parses a setting string ({node.func.attr}('='))")
    return sorted(bad, key=lambda line: int(line.split(":")[1].split()[0]))


def test_no_setting_strings_inside_the_package():
    bad = [line for m, path in package_files().items() if layer(m) in CHECKED
           for line in setting_strings(m, path.read_text(), str(path.relative_to(Path(__file__).parents[1])))]
    assert bad == []


def test_the_rule_catches_setting_strings():
    source = '''"""Doc: model.size=3 is fine here."""
SETS = ["model.image_size=64", "stages=2"]


def overrides(lr):
    return [f"stage1.lr={lr}", f"{lr}", "a == b", "x = 1"]


def parse(item):
    key, _, value = item.partition("=")
    return item.split("=", 1)


def apply_overrides(cfg, items):
    return [i.split("=", 1) for i in items]


def check(v):
    raise ValueError(f"eval.select={v!r}: use ndcg@K")


def cli(p):
    p.add_argument("--set", nargs="*", metavar="section.key=value", help="stage1.lr=0.001 ...")
'''
    assert setting_strings("transrec.trainer.core.overrides", source, "m.py") == [
        "m.py:2 writes a setting string: 'model.image_size=64'", "m.py:2 writes a setting string: 'stages=2'",
        "m.py:6 writes a setting string: 'stage1.lr='", "m.py:10 parses a setting string (partition('='))",
        "m.py:11 parses a setting string (split('='))"]
