"""The paper's experiments (tables 2, 4-7) as cached training runs: `python -m transrec.trainer.experiments TABLE`.

`plans.py` holds the tables as data (domains, models, rows, headline comparisons, claims), `runner.py` trains or
reuses the runs and computes the results, `report.py` writes Markdown / CSV / PNG. Imports go one way: runner ->
report -> plans (the report's type hints name the runner's Suite only for type checking). Reports and run records
are written under `reports/` at the repository root, never inside this package.
"""

from transrec.trainer.experiments.plans import DOMAINS, PLANS, RunSpec  # noqa: F401
from transrec.trainer.experiments.runner import (  # noqa: F401  (the package's public names)
    TABLES,
    Suite,
    check_same_split,
    drop_settings_that_change_nothing,
    evaluate_view,
    main,
    parse_args,
)
