"""What a mixture of catalogues costs: step time, steps per epoch and peak memory against one catalogue as large.

    python bench/mixture_cost.py [--items 2000] [--users 300] [--out bench/results/mixture_cost_cpu]

Synthetic catalogues (data_shards/synth.py, text view, a 2-layer 32-wide random BERT so that caching is quick) of
`--items` items and `--users` users each, trained with stage 1 of `cpu-small` (the full catalogue softmax: forced with
full_catalogue_max so that every configuration scores its whole catalogue) in a fresh process per configuration:

- one catalogue; mixtures of 2 and 4 such catalogues (data_shards/mixture.py);
- one catalogue as large as the 4-mixture (4x the items and users): what the mixture would cost if its catalogues
  were one.

Per configuration: seconds per step (median of 5 after a warm-up, Trainer.time_steps), steps per epoch, their product
(an epoch's training time) and the process's peak RSS. A mixture's batch is scored against its own catalogue: its
step should cost what one catalogue's does, its epoch grow with its interactions; the single large catalogue's step
grows with its items. Figures go to OUT.json / OUT.md with the command and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:  # before any other import: this folder off sys.path (trainer/commands/script_path.py)
    from transrec.trainer.commands.script_path import run_as_script
except ModuleNotFoundError:
    raise SystemExit("error: transrec is not installed in this Python: `make install` or `pip install -e .`") from None
run_as_script(__file__, offline=True)

from transrec.data_shards.mixture import Catalogue, mix  # noqa: E402
from transrec.data_shards.synth import synthesize  # noqa: E402
from transrec.trainer.core.config import changed  # noqa: E402
from transrec.trainer.core.presets import preset  # noqa: E402
from transrec.trainer.experiments.suite import make_tiny_bert  # noqa: E402
from transrec.trainer.training.loop import Trainer  # noqa: E402


def one(shards: Path, text_encoder: Path, run_dir: Path) -> dict:
    """In this process: a Trainer on `shards`, 5 timed stage-1 steps."""
    def text_only_full_softmax(c) -> None:
        c.data.shards, c.model.text.encoder, c.run_dir = str(shards), str(text_encoder), str(run_dir)
        c.data.modality_override, c.data.feature_store, c.monitor.projector = "text", None, False
        c.stage1.full_catalogue_max, c.stage1.candidates = 100000, "full"

    cfg = changed(preset("cpu-small"), text_only_full_softmax)
    trainer = Trainer(cfg, str(REPO / "ds_configs" / "zero2.json"))
    step_s, steps = trainer.time_steps(1, steps=5)
    return {"step_s": step_s, "steps_per_epoch": steps, "epoch_s": step_s * steps,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "bench_mixture")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mixture_cost_cpu")
    p.add_argument("--one", nargs=3, type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(one(*a.one)))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    bert = a.work / "tiny_bert"
    if not (bert / "config.json").exists():
        make_tiny_bert(bert)
    cats = []
    for k in range(4):
        out = a.work / f"cat{k}"
        if not (out / "manifest.json").exists():
            synthesize(out, a.users, a.items, seed=k)
        cats.append(out)
    large = a.work / "large"
    if not (large / "manifest.json").exists():
        synthesize(large, 4 * a.users, 4 * a.items, seed=9)
    configs = {"one catalogue": cats[0]}
    for n in (2, 4):
        folder = a.work / f"mix{n}"
        if not (folder / "manifest.json").exists():
            mix([Catalogue(c, f"c{i}") for i, c in enumerate(cats[:n])], folder)
        configs[f"mixture of {n}"] = folder
    configs["one catalogue, 4x as large"] = large
    rows = {}
    for name, shards in configs.items():
        out = subprocess.run([sys.executable, __file__, "--one", str(shards), str(bert), str(a.work / "run")],
                             capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{name}: the measurement failed:\n{out.stderr[-3000:]}")
        manifest = json.loads((shards / "manifest.json").read_text())
        rows[name] = {"items": manifest["num_items"], "interactions": manifest["num_interactions"],
                      "largest_catalogue": max((c["items"][1] - c["items"][0] for c in manifest.get("catalogues", [])),
                                               default=manifest["num_items"]), **json.loads(line[7:])}
        print(name, rows[name], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    command = "python bench/mixture_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"command": command.strip(), "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_1min": os.getloadavg()[0], "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = [f"# Mixture cost (CPU, 2 cores; `{record['command']}` at {commit}, {record['date']}, 1-min load "
             f"{record['load_1min']:.1f})", "",
             "| configuration | items | largest catalogue | interactions | s / step | steps / epoch | epoch s | "
             "peak RSS GiB |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['items']} | {r['largest_catalogue']} | {r['interactions']} | {r['step_s']:.3f} | "
                     f"{r['steps_per_epoch']} | {r['epoch_s']:.1f} | {r['peak_rss_gib']:.2f} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
