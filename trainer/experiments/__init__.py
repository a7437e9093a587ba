"""The paper's experiments (tables 2, 4-7) as cached training runs: `python -m transrec.trainer.experiments TABLE`.

`plans.py` holds the tables as data (domains, models, rows, headline comparisons, claims), `suite.py` configures,
keys and trains or reuses the runs (through the core's `train(cfg)`), `runner.py` drives a table's runs, computes its
results and holds the command line, `run_keys.py` says what a cached run's key covers, `views.py` evaluates a run on
other shards of the same split (table 2), `report.py` writes Markdown / CSV / PNG; the studies (`cross_catalogue.py`,
`auto_row.py`) read the cached runs. Imports go one way: runner -> suite -> plans, runner -> report -> plans (the
report's type hints name the suite's Suite only for type checking); this package file imports nothing, so importing
a submodule never imports the runner. Reports and run records are written under `reports/` at
the repository root, never inside this package.
"""
