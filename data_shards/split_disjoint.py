"""Split an H&M-format folder into two domains that share no customers and no articles.

    python -m transrec.data_shards.split_disjoint --source ../shared/datasets/hm-fashion --out reports/raw/hm-split-0 \
        [--seed 0] [--fraction-a 0.5]

A source and a target from the same platform, for asking whether transfer fails for the method or for the source:
customers go to half A when the first byte of sha256("transrec-split:{seed}:{customer id}") is below
256 * fraction_a, else to half B. A keeps every purchase of its customers. B keeps a purchase only when no A customer
bought the same article, so that the halves share no item; every purchase B loses that way is counted. Each half is a
folder in the H&M layout (transactions.csv, articles.csv with the articles its purchases name, customers.csv,
images/ linked to the source's), which `python -m transrec.data_shards.build --dataset hm-fashion` reads.
Rows are copied
verbatim. `split_report.json` records the rule and the counts, including how many of B's kept purchases name an
article whose product (`product_code`: the same garment in another colour) A bought.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from pathlib import Path

from transrec.data_shards.split_files import publish, staging, write_side

FILES = ("transactions.csv", "articles.csv", "customers.csv")


def half_of(customer: str, seed: int, fraction_a: float) -> str:
    return "a" if hashlib.sha256(f"transrec-split:{seed}:{customer}".encode()).digest()[0] < 256 * fraction_a else "b"


def _read(path: Path, key: str) -> tuple[list[str], list[list[str]], int]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or key not in header:
            raise SystemExit(f"error: {path} has no column {key!r} in its header: is --source an H&M-format folder "
                             f"({', '.join(FILES)}, images/)?")
        return header, list(reader), header.index(key)


def split_disjoint(source: Path, out: Path, *, seed: int = 0, fraction_a: float = 0.5) -> dict:
    """Write out/a and out/b (H&M layout) and out/split_report.json; returns the report."""
    if not 0 < fraction_a < 1:
        raise SystemExit(f"error: --fraction-a {fraction_a} must lie strictly between 0 and 1")
    missing = [n for n in (*FILES, "images") if not (source / n).exists()]
    if missing:
        raise SystemExit(f"error: {source} lacks {', '.join(missing)}: pass an H&M-format folder as --source")
    tx_header, tx, cust_col = _read(source / "transactions.csv", "customer_id")
    art_col = tx_header.index("article_id")
    by_half: dict[str, list[list[str]]] = {"a": [], "b": []}
    for r in tx:
        by_half[half_of(r[cust_col], seed, fraction_a)].append(r)
    b_all = by_half["b"]
    bought_by_a = {r[art_col] for r in by_half["a"]}
    halves = {"a": by_half["a"], "b": [r for r in b_all if r[art_col] not in bought_by_a]}

    art_header, articles, art_key = _read(source / "articles.csv", "article_id")
    product_of = {r[art_key]: r[art_header.index("product_code")] for r in articles} \
        if "product_code" in art_header else {}
    products_a = {product_of.get(a) for a in bought_by_a} - {None}
    cust_header, customers, cust_key = _read(source / "customers.csv", "customer_id")

    tmp = staging(out)
    report = {"source": source.name, "rule": f"customer -> a iff sha256('transrec-split:{seed}:<customer_id>')[0] < "
              f"{256 * fraction_a:g}; b keeps a purchase only if no a customer bought its article",
              "seed": seed, "fraction_a": fraction_a, "purchases_in_source": len(tx),
              "b_purchases_dropped_article_bought_by_a": len(b_all) - len(halves["b"]),
              "b_customers_with_every_purchase_dropped": len({r[cust_col] for r in b_all})
              - len({r[cust_col] for r in halves["b"]}),
              "b_purchases_kept_whose_product_a_bought": sum(product_of.get(r[art_col]) in products_a
                                                             for r in halves["b"]), "halves": {}}
    for name, rows in halves.items():
        wanted_customers, wanted_articles = {r[cust_col] for r in rows}, {r[art_col] for r in rows}
        write_side(tmp / name, (("transactions.csv", tx_header, rows, None, None),
                                ("articles.csv", art_header, articles, art_key, wanted_articles),
                                ("customers.csv", cust_header, customers, cust_key, wanted_customers)),
                   source / "images")
        report["halves"][name] = {"customers": len(wanted_customers), "articles": len(wanted_articles),
                                  "purchases": len(rows)}
    publish(tmp, out, report)
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m transrec.data_shards.split_disjoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="H&M-format folder (transactions.csv, articles.csv, ...)")
    p.add_argument("--out", required=True, help="folder to create, with a/, b/ and split_report.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the customer hash")
    p.add_argument("--fraction-a", type=float, default=0.5, help="expected share of customers in half A")
    a = p.parse_args(argv)
    report = split_disjoint(Path(a.source), Path(a.out), seed=a.seed, fraction_a=a.fraction_a)
    h = report["halves"]
    print(f"wrote {a.out}: a {h['a']['customers']} customers / {h['a']['purchases']} purchases / {h['a']['articles']} "
          f"articles; b {h['b']['customers']} / {h['b']['purchases']} / {h['b']['articles']}; b lost "
          f"{report['b_purchases_dropped_article_bought_by_a']} purchases of articles a bought "
          f"({report['b_customers_with_every_purchase_dropped']} customers lost all)", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
