"""The repository's documents: they speak of the project only, and every relative link in them resolves.

- No Markdown file, and no string the report generators write into a report, speaks of sessions, of the people or
  tools that wrote it, or of one machine's absolute paths (FORBIDDEN).
- Every relative link and image in a Markdown file names a file or folder of the repository; a link to a heading
  (`FILE.md#anchor`, `#anchor`) names a heading that exists in that file.
- reports/README.md indexes every top-level report and every study folder under reports/.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# what a document of the project never says: the words and the paths of whoever or whatever wrote it
FORBIDDEN = {
    "a session": re.compile(r"\bsessions?\b", re.I),
    "a tool or model that wrote it": re.compile(
        r"\b(claude|anthropic|chatgpt|openai|copilot|gpt-\d|llms?|sub-?agents?|ai assistants?)\b", re.I),
    "a machine's absolute path": re.compile(
        r"(?<![\w.~/-])(/(?:work|home|Users|root|mnt|tmp|private|opt/pypi)/[\w.-]+|[A-Z]:\\\\?Users)"),
}
# the modules whose strings become reports (tables, results.md, transfer verdicts, benches' Markdown)
REPORT_GENERATORS = ("trainer/monitoring/run_results.py", "trainer/transfer/selection.py",
                     "trainer/training/transfer_auto.py",
                     "trainer/experiments/report.py", "trainer/experiments/auto_row.py",
                     "trainer/experiments/runner.py", "trainer/experiments/plans.py", "bench/throughput.py",
                     "bench/serve_load.py")
SKIP_DIRS = {".venv", ".venv-lock", "build", ".pytest_cache", ".git", "node_modules", ".cache", "shards"}

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
FENCE = re.compile(r"^([ \t]*)(```|~~~).*?^\1\2[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)


def markdown_files() -> list[Path]:
    """Tracked and new (not ignored) Markdown files; outside a git checkout, every .md below the root."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.md"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.split()
        files = [REPO / f for f in out]
    except (OSError, subprocess.CalledProcessError):
        files = list(REPO.rglob("*.md"))
    return sorted(f for f in files if f.is_file() and not SKIP_DIRS & set(f.relative_to(REPO).parts)
                  and f.relative_to(REPO).parts[0] != "runs")


def forbidden_in(text: str) -> list[str]:
    """'what: the matched text' for each forbidden word or path in text."""
    return [f"{what}: {m.group(0)!r}" for what, rx in FORBIDDEN.items() for m in rx.finditer(text)]


def strings_of(source: str) -> list[str]:
    """Every string literal of a module, the literal parts of f-strings included (docstrings too)."""
    return [n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation removed but '-' and '_', spaces to '-'."""
    text = re.sub(r"[`*_]{1,2}(?=\S)|(?<=\S)[`*_]{1,2}", "", heading.strip())  # emphasis and code marks
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", md.read_text()).splitlines():
        m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_targets(text: str) -> list[str]:
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return LINK.findall(prose) + REF_LINK.findall(prose)


def broken_links(md: Path, root: Path = REPO) -> list[str]:
    """'target (why)' for each relative link of md that does not resolve inside root."""
    bad = []
    for target in link_targets(md.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if root.resolve() not in (dest, *dest.parents):
            bad.append(f"{target} (outside the repository)")
        elif not dest.exists():
            bad.append(f"{target} (no such file or folder)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target} (no heading '#{anchor}' in {dest.relative_to(root.resolve())})")
    return bad


def test_documents_speak_of_the_project_only():
    files = markdown_files()
    assert REPO / "README.md" in files and REPO / "RESULTS.md" in files and len(files) > 20
    found = [f"{f.relative_to(REPO)}: {hit}" for f in files for hit in forbidden_in(f.read_text())]
    assert not found, "documents must speak of the project only:\n" + "\n".join(found)


@pytest.mark.parametrize("module", REPORT_GENERATORS)
def test_report_templates_speak_of_the_project_only(module):
    found = [hit for s in strings_of((REPO / module).read_text()) for hit in forbidden_in(s)]
    assert not found, f"{module} writes into reports: " + "; ".join(found)


def test_the_word_list_catches_what_it_should():
    hits = forbidden_in("As measured in session 5 by Claude, see /work/main/RESULTS.md or /home/me/x and C:\\Users")
    assert [h.split(":")[0] for h in hits] == ["a session", "a tool or model that wrote it",
                                               "a machine's absolute path", "a machine's absolute path",
                                               "a machine's absolute path"]
    assert not forbidden_in("data_shards/README.md, reports/runs/ab12/, "
                            "`python -m transrec.trainer.commands.evaluate`, "
                            "sessionless, possession, a path like runs/x/export or ../shared/datasets")
    assert strings_of('x = f"in session {n}"\n"""Doc."""\n') == ["Doc.", "in session "]


def test_every_relative_link_in_the_docs_resolves():
    broken = [f"{f.relative_to(REPO)}: {b}" for f in markdown_files() for b in broken_links(f)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_check_catches_what_it_should(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text(
        "# Results on real data\n\n## The `auto` row: 3 seeds\n\n## Notes\n## Notes\n")
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.md").write_text(
        "# Top\n[ok](sub/b.md) [ok](sub/b.md#results-on-real-data) [ok](sub/b.md#the-auto-row-3-seeds) "
        "[ok](sub/b.md#notes-1) ![img](a.png) [ok](#top) [web](https://example.org/x) [dir](sub/)\n"
        "`[not a link](nowhere.md)`\n```\n[not a link](nowhere.md)\n```\n"
        "[missing](c.md) [bad anchor](sub/b.md#nope) [up](../../etc/passwd) ![img](b.png)\n[ref]: sub/d.md\n")
    assert broken_links(tmp_path / "a.md", root=tmp_path) == [
        "c.md (no such file or folder)", "sub/b.md#nope (no heading '#nope' in sub/b.md)",
        "../../etc/passwd (outside the repository)", "b.png (no such file or folder)",
        "sub/d.md (no such file or folder)"]


def test_reports_index_names_every_report_and_study():
    reports = REPO / "reports"
    index = (reports / "README.md").read_text()
    linked = {t.partition("#")[0].rstrip("/") for t in link_targets(index)}
    top = {p.name for p in reports.glob("*.md") if p.name != "README.md"}
    studies = {p.name for p in reports.iterdir() if p.is_dir() and any(p.glob("*.md")) and p.name != "runs"}
    linked_folders = {t.split("/")[0] for t in linked if "/" in t} | linked
    missing = sorted((top - linked) | (studies - linked_folders))
    assert not missing, f"reports/README.md does not index: {missing}"
    for study in studies:  # each study folder's reports are listed in the index too
        unlisted = sorted(f"{study}/{p.name}" for p in (reports / study).glob("*.md")
                          if f"{study}/{p.name}" not in linked)
        assert not unlisted, f"reports/README.md does not list: {unlisted}"


def test_results_page_starts_with_the_claims_table():
    """RESULTS.md's first table is the paper's claims, each with a measurement, seeds, a verdict and a report."""
    text = FENCE.sub("", (REPO / "RESULTS.md").read_text())
    first_table = re.search(r"^\|.*\|$(?:\n^\|.*\|$)+", text, re.M)
    assert first_table, "RESULTS.md has no table"
    header, rule, *rows = first_table.group(0).splitlines()
    cols = [c.strip().lower() for c in header.strip("|").split("|")]
    assert {"claim", "paper", "verdict", "report", "seeds"} <= set(cols), cols
    assert len(rows) >= 8
    verdicts = re.compile(r"\*\*(reproduced|partly|not reproduced)\*\*")
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert verdicts.search(cells[cols.index("verdict")]), f"no verdict word in: {row[:80]}"
        measured = cells[next(i for i, c in enumerate(cols) if "measurement" in c)]
        assert re.search(r"\[[-+]\d\.\d{4}, [-+]\d\.\d{4}\]", measured), f"no interval in: {row[:80]}"
        assert LINK.search(cells[cols.index("report")]), f"no report linked in: {row[:80]}"


def test_readme_first_screen_trains_evaluates_recommends_and_summarises():
    first_screen = "\n".join((REPO / "README.md").read_text().splitlines()[:70])
    for needed in ("make train", "make test", "transrec.trainer.commands.recommend",
                   "transrec.trainer.commands.compare", "RESULTS.md"):
        assert needed in first_screen, f"README.md's first 70 lines lack {needed!r}"
    summary = re.search(r"^## Results.*?$(.*?)^## ", first_screen + "\n## ", re.M | re.S)
    assert summary, "README.md's first screen has no '## Results' summary"
    bullets = [line for line in summary.group(1).splitlines() if line.startswith("- ")]
    assert 3 <= len(bullets) <= 5, f"the results summary has {len(bullets)} bullets, not five or fewer"
