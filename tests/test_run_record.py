"""bench/run_record.py: the commands benches record name no machine's folders: a path inside the repository is
written relative to it, any other absolute path as SCRATCH, also where it is the value of a setting."""

from __future__ import annotations

from conftest import REPO

from transrec.bench.run_record import recorded_command


def test_recorded_commands_name_no_machines_folders():
    args = ["--preset", "paper", "--set", "data.shards=/tmp/gpu_work/ml", f"model.text.encoder={REPO}/.gpu/tok",
            "--json", "/tmp/gpu_work/tp/out.json", "--md", str(REPO / "bench" / "results" / "x.md"),
            "stage1.lr=1e-3", "--eval-sizes", "10000,100000"]
    assert recorded_command("python bench/throughput.py", args) == (
        "python bench/throughput.py --preset paper --set data.shards=SCRATCH model.text.encoder=.gpu/tok "
        "--json SCRATCH --md bench/results/x.md stage1.lr=1e-3 --eval-sizes 10000,100000")
