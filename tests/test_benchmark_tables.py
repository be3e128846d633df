"""benchmarks/README.md's results table is the one benchmarks/results/*.json give
(benchmarks/_tables.py), and it says for every file what the file says: its claims, how many
hold, its figure. A results file added, changed or removed without regenerating the table
fails here."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
RESULTS = BENCHMARKS / "results"
README = BENCHMARKS / "README.md"


def load_tables():
    spec = importlib.util.spec_from_file_location("benchmark_tables", BENCHMARKS / "_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = load_tables()


def table_rows(text: str) -> dict[str, list[list[str]]]:
    """The generated table's rows by result name (a row with an empty name continues the one above)."""
    section = text.split(tables.BEGIN)[1].split(tables.END)[0]
    rows: dict[str, list[list[str]]] = {}
    name = None
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| result |"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells[0]:
            name = re.fullmatch(r"\[(\w+)\]\(results/\w+\.json\)", cells[0]).group(1)
        rows.setdefault(name, []).append(cells)
    return rows


def test_the_readme_table_is_the_one_the_results_give():
    assert tables.stale(README, RESULTS) is None, "run: python benchmarks/_tables.py"


def test_every_results_file_is_in_the_table_with_its_claims_holds_and_figure():
    rows = table_rows(README.read_text())
    files = sorted(RESULTS.glob("*.json"))
    assert sorted(rows) == [p.stem for p in files] and len(files) > 10
    for path in files:
        result = json.loads(path.read_text())
        mine = rows[path.stem]
        if "claims" in result:  # read here independently of _tables.claims_of
            assert len(mine) == len(result["claims"]), path.name
            assert [r[4] == "holds" for r in mine] == [bool(c["holds"]) for c in result["claims"]], path.name
            for r, c in zip(mine, result["claims"]):
                assert r[1].replace("\\|", "|").startswith(" ".join(c["claim"].split())[:100]), path.name
        assert all(r[4] in ("holds", "**fails**") for r in mine)
        figure = f"[figure](results/{path.stem}.png)"
        assert (figure in mine[0][5]) == path.with_suffix(".png").exists(), path.name


def test_a_changed_claim_makes_the_table_stale(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results, ignore=shutil.ignore_patterns("*.png", "*.md"))
    readme = tmp_path / "README.md"
    readme.write_text(tables.render(README.read_text(), tables.table(results)))
    assert tables.stale(readme, results) is None
    path = results / "r7_homogeneity.json"
    result = json.loads(path.read_text())
    result["claims"][0]["holds"] = not result["claims"][0]["holds"]
    path.write_text(json.dumps(result))
    assert tables.stale(readme, results) is not None
    # the command line says so too, and rewriting the table makes it current again
    assert tables.main(["--check", "--readme", str(readme), "--results", str(results)]) == 1
    assert tables.main(["--readme", str(readme), "--results", str(results)]) == 0
    assert tables.stale(readme, results) is None


def test_cells_are_short_escaped_and_faithful():
    assert tables.short(332961.5) == "332,962" and tables.short(0.000075702) == "7.57e-05"
    assert tables.short(124.99999999999999) == "125" and tables.short(True) == "yes" and tables.short(None) == "-"
    assert tables.short([-99.4, -97.0, -99.0, -99.1, -97.1]) == "5 values in [-99.4, -97]"
    assert tables.short([float("nan")] * 3) == "[nan, nan, nan]"
    assert tables.short({"plain": 24.46, "layernorm": [1, 2]}) == "{plain: 24.5, layernorm: [1, 2]}"
    assert tables.cell("1/||u|| linear") == "1/\\|\\|u\\|\\| linear"
    assert tables.cell("x" * 500).endswith("...") and len(tables.cell("x" * 500)) == tables.CELL_CHARS


def test_targets_of_files_without_claims_become_rows():
    claims = tables.claims_of({"target": {"cost_below": 0.01, "meets": False}, "cost_measured": 0.02}, "cost")
    assert claims == [{"claim": "target: cost_below 0.01", "published": None,
                       "measured": {"cost_measured": 0.02}, "holds": False}]
    claims = tables.claims_of({"targets": {"gram": {"description": "20x faster", "measured": 56.0, "meets": True}}},
                              "speed")
    assert claims[0]["claim"] == "target (gram): 20x faster" and claims[0]["holds"] is True
    with pytest.raises(tables.TableError, match="broken.json has neither"):
        tables.claims_of({"numbers": [1, 2]}, "broken")
    with pytest.raises(tables.TableError, match="must hold the line"):
        tables.render("no markers here", "| table |")
