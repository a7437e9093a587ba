"""Cut the small, seeded H&M fixture that the tests use from the full H&M sample.

    python -m transrec.data_shards.make_fixture --source ../shared/datasets/hm-fashion --out data/hm-fashion-fixture

Customers are drawn with a seeded generator from those with 3..7 purchases (so that the fixture has
evaluable users yet stays under ~5 MB with one photo per article); every purchase of a drawn customer is
kept, with the article rows, customer rows and images those purchases name. Rows are copied verbatim.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
from pathlib import Path

PROVENANCE = """# H&M fixture (for tests)

A seeded cut of `hm-fashion` (0.1%-of-customers sample of H&M purchases: transactions from public repository
hungle45/PSE-Recommendor-System, commit 3b7354e7; article table from Tisha1503/HM-Fashion-Recommender).
H&M Personalized Fashion Recommendations competition data, non-commercial research terms: for this project's
tests and examples only; do not redistribute.

Made by `python -m transrec.data_shards.make_fixture --seed {seed} --customers {customers}`: {n_customers} customers
drawn from those with {lo}..{hi} purchases, all their {n_tx} purchases, their {n_articles} articles and
article photos (160x240 JPEG, unchanged), and their customer rows.
"""


def make_fixture(source: Path, out: Path, *, seed: int = 0, customers: int = 200, lo: int = 3, hi: int = 7) -> None:
    with open(source / "transactions.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    cust_col, art_col = header.index("customer_id"), header.index("article_id")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[cust_col]] = counts.get(r[cust_col], 0) + 1
    eligible = sorted(c for c, n in counts.items() if lo <= n <= hi)
    if len(eligible) < customers:
        raise SystemExit(f"only {len(eligible)} customers have {lo}..{hi} purchases; ask for fewer")
    chosen = set(random.Random(seed).sample(eligible, customers))
    kept = [r for r in rows if r[cust_col] in chosen]
    articles = {r[art_col] for r in kept}

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    with open(tmp / "transactions.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(kept)
    for name, key, wanted in (("articles.csv", "article_id", articles), ("customers.csv", "customer_id", chosen)):
        with open(source / name, newline="") as f_in, open(tmp / name, "w", newline="") as f_out:
            reader = csv.reader(f_in)
            head = next(reader)
            w = csv.writer(f_out, lineterminator="\n")
            w.writerow(head)
            col = head.index(key)
            w.writerows(r for r in reader if r[col] in wanted)
    for a in sorted(articles):
        src = source / "images" / a[:3] / f"{a}.jpg"
        if src.exists():
            (tmp / "images" / a[:3]).mkdir(exist_ok=True)
            shutil.copyfile(src, tmp / "images" / a[:3] / f"{a}.jpg")
    (tmp / "PROVENANCE.md").write_text(
        PROVENANCE.format(
            seed=seed,
            customers=customers,
            n_customers=len(chosen),
            lo=lo,
            hi=hi,
            n_tx=len(kept),
            n_articles=len(articles),
        )
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {out}: {len(chosen)} customers, {len(kept)} purchases, {len(articles)} articles")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--customers", type=int, default=200)
    a = p.parse_args()
    make_fixture(a.source, a.out, seed=a.seed, customers=a.customers)


if __name__ == "__main__":
    main()
