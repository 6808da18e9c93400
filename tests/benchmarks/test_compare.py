"""`benchmarks/compare.py`: every registered method's row, the Table 5 rows, the accuracy cache a
rerun reads instead of recomputing, and the variants and skips it finds in the registry at run time.

The script is loaded from its file (benchmarks are scripts, not a package), on a few test questions."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import illava
from illava import Schedule
from illava.backbones import load_backbone
from illava.methods import RandomDrop, register_method, unregister_method
from illava.methods.random_drop import RandomParams

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compare.py"


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


compare = _script()


def _rows(text: str, ratio: str = "88.9%") -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith(f"| {ratio} |")]


def _section(out: str, title: str) -> str:
    return out.split(title, 1)[1].split("\n\n", 2)[1]  # the table after the title line


@pytest.mark.slow  # ~13 s: the default suite keeps the cheap ones below
def test_two_methods_one_ratio_tables_cache_and_rerun(tmp_path, capsys):
    cache, markdown, png = tmp_path / "acc.jsonl", tmp_path / "out.md", tmp_path / "plot.png"
    argv = ["--methods", "fastv", "random", "--ratios", "88.9%", "--limit", "4", "--batch-size", "4",
            "--seeds", "1", "--cache", str(cache)]  # fmt: skip
    speed = ["--speed-backbone", "tiny", "--size", "224", "--rounds", "1", "--warmup", "0"]
    compare.main(argv + speed + ["--markdown", str(markdown), "--plot", str(png)])
    out = capsys.readouterr().out

    placed = _rows(_section(out, "(the paper's Tables 1 and 6):"))
    assert [row[1] for row in placed] == ["fastv", "random"]
    assert placed[0][2] == "L[0] 100%"  # FastV on its own stage: one LLM layer, no encoder share
    assert placed[1][2] == "E[1, 2, 3] 40% + L[0, 1, 3]"  # random at the paper's placement on demo
    for row in placed:
        assert re.fullmatch(r"\d+\.\d% \(\d+\.\d%\).*", row[3]), row  # accuracy (retention)
        assert re.fullmatch(r"\d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\)", row[5]), row  # paired speedup
    assert re.fullmatch(r"[+-]\d+\.\d% \[[+-]\d+\.\d%, [+-]\d+\.\d%\]", placed[0][4])  # vs random, 95% CI
    assert placed[1][4] == "—"  # the baseline itself

    paper = _rows(_section(out, "only the merge rule swapped (Table 5):"))
    assert [row[1] for row in paper] == ["random"]
    assert "- `fastv`: method 'fastv'" in out  # why it has no Table 5 row

    lines = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(lines) == 3  # unmerged, fastv, random seed 0
    methods = [Schedule.from_dict(row["schedule"]) for row in lines]
    assert [s.method for s in methods][1:] == ["fastv", "random"] and methods[0].removes_nothing
    for row in lines:
        assert len(row["hits"]) == 4 and set(row["hits"]) <= {"0", "1"}
        assert row["accuracy"] == row["hits"].count("1") / 4
        assert re.fullmatch(r"[0-9a-f]{64}", row["identity"]["checkpoint"]["sha256"])
        assert row["identity"]["questions"]["n"] == 4 and "commit" in row["code"]
    assert "`python benchmarks/compare.py --methods fastv random" in markdown.read_text()
    assert png.read_bytes()[:4] == b"\x89PNG"

    compare.main(argv + ["--skip-speed"])  # everything cached: nothing recomputed, the same accuracies
    again = capsys.readouterr()
    assert len(cache.read_text().splitlines()) == 3
    assert "3 of 3 evaluations from" in again.err and "0 evaluations run now" in again.out
    assert [row[:5] for row in _rows(_section(again.out, "Tables 1 and 6):"))] == [row[:5] for row in placed]

    fresh = [arg if arg != "random" else "--fresh" for arg in argv]  # --methods fastv --fresh
    compare.main(fresh + ["--skip-speed"])  # only the named row is recomputed: not the baseline, not unmerged
    assert "2 of 3 evaluations from" in capsys.readouterr().err
    assert [json.loads(line)["schedule"]["method"] for line in cache.read_text().splitlines()][3:] == ["fastv"]


@dataclass(frozen=True)
class FlaggedParams(RandomParams):
    text_guided: bool = False


class Flagged(RandomDrop):
    """Random dropping with a variant flag: acts at both stages, so the paper's placement fits it."""

    name = "test-flagged"
    params_type = FlaggedParams


class Unplaceable(RandomDrop):
    """Acts at both stages but merges after no LLM layer: iLLaVA's default cannot be moved onto it."""

    name = "test-unplaceable"
    max_llm_layers = 0


@pytest.fixture
def toys():
    methods = [register_method(Flagged()), register_method(Unplaceable())]
    yield methods
    for method in methods:
        unregister_method(method.name)


def test_registry_read_at_run_time_with_variants_and_skips(toys):
    labels = [v.label for v in compare.select_variants(None)]
    assert labels[-3:] == ["test-flagged", "test-flagged+text-guided", "test-unplaceable"]
    assert [v.label for v in compare.select_variants(["fastv"])] == ["fastv", "random"]
    with pytest.raises(SystemExit, match=r"unknown \['tome-x'\]; registered: illava"):
        compare.select_variants(["tome-x"])

    names = ["test-flagged", "test-flagged+text-guided", "divprune", "downsample", "test-unplaceable"]
    grid = compare.Grid.build(compare.select_variants(names), [8 / 9], (8, 6))
    assert grid.paper["test-flagged+text-guided", 8 / 9].params.text_guided is True
    for name in ("divprune", "downsample"):  # all of the removal before the LLM, so no Table 5 row
        assert grid.placed[name, 8 / 9].encoder_share == 1.0
        assert "encoder_share must be 1" in grid.paper[name, 8 / 9]
    assert "needs at least one entry in llm_layers" in grid.placed["test-unplaceable", 8 / 9]
    # each once although most are in both tables: the flagged pair, divprune, downsample, random
    assert len(grid.schedules()) == 5


def test_a_downsample_schedule_is_timed_on_its_smaller_image():
    backbone = load_backbone("tiny")
    schedule = compare.Variant("downsample").placed(8 / 9, illava.depths(backbone.model))
    full, small = (compare.speed_batch(backbone, s, 224, torch.device("cpu")) for s in (compare.VANILLA, schedule))
    tokens = [
        sum(backbone.adapter.image_tokens(backbone.adapter.inner_model(backbone.model), b)) for b in (full, small)
    ]
    assert tokens[1] < tokens[0] / 4  # about what the plan keeps of 64: 8, on a 3x3 grid 9


def test_ratios_snap_to_the_papers():
    assert compare.paper_ratio("88.9%") == 8 / 9 and compare.paper_ratio("0.667") == 2 / 3
    assert compare.paper_ratio("0.5") == 0.5


@pytest.mark.slow
def test_every_registered_method_gets_a_row_at_every_ratio(tmp_path, capsys):
    """The whole registry as it is when the test runs (a method just added included): each variant is
    placed, scored and timed at the paper's three ratios without a failed cell (about 2 minutes)."""
    argv = ["--limit", "4", "--batch-size", "4", "--seeds", "2", "--cache", str(tmp_path / "acc.jsonl"),
            "--speed-backbone", "tiny", "--size", "224", "--rounds", "1", "--warmup", "0"]  # fmt: skip
    compare.main(argv)
    out = capsys.readouterr().out
    assert "failed" not in out
    labels = [v.label for v in compare.select_variants(None)]
    placed = _section(out, "(the paper's Tables 1 and 6):")
    for ratio in ("66.7%", "77.8%", "88.9%"):
        assert [row[1] for row in _rows(placed, ratio)] == labels
