"""Running a file of bench/ or trainer/ by its path: `python bench/throughput.py`, `deepspeed trainer/main.py`.

Python puts a script's own folder first on sys.path, where the folder's module names (bench/loader.py, scale.py,
trainer/core/config.py, model.py, ...) would shadow any dependency's module of the same name. The project imports as
`transrec.*` (setup.py), so such a script takes its folder off sys.path first, before any other import:

    try:
        from transrec.trainer.commands.script_path import run_as_script
    except ModuleNotFoundError:
        raise SystemExit("error: transrec is not installed here: run `make install` or `pip install -e .`") from None
    run_as_script(__file__)

Importing this module while the folder is still on sys.path is safe: no folder holds a `transrec` entry, and the
module imports only the standard library. Its import is also what fails when the transrec package is not installed
in the Python that runs the script, hence the script's own `except` (this module's message cannot be imported then).
Library modules of bench/ that are also scripts (kernel_bench_common.py) run it on import too: harmless, the folder
is not on sys.path then. tests/test_script_path.py checks that no other file of bench/ or trainer/ edits sys.path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Hugging Face Hub offline: the text towers load installed or local weights only, never the network.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_as_script(file: str, *, offline: bool = False) -> None:
    """Take the folder of the script `file` (its `__file__`) off sys.path. `offline`: also default the Hugging Face
    offline switches (`OFFLINE`; a value already set in the environment wins), for the scripts that build text
    towers (training, the throughput and scale benches)."""
    folder = Path(file).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != folder]
    if offline:
        for name, value in OFFLINE.items():
            os.environ.setdefault(name, value)
