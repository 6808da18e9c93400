"""The demo benchmark scripts behind docs/benchmarks.md's accuracy section run and print their tables.

They are scripts, not a package: loaded from their files, on a handful of test questions."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _percents(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"(-?\d+\.?\d*)%", line)]


@pytest.mark.parametrize("stages", [False, True])
def test_demo_accuracy_prints_one_row_per_ratio(capsys, stages):
    argv = ["--items", "5", "--seeds", "1"] + (["--stages"] if stages else [])
    _script("demo_accuracy").main(argv)
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| \d+\.\d%", line)]
    # stages: one row per ratio and stage; else one per ratio in each of the two tables
    assert len(rows) == 6
    for row in rows:
        assert all(-100 <= p <= 100 for p in _percents(row))
    if stages:
        assert [row.split("|")[2].strip() for row in rows] == ["encoder", "LLM"] * 3


def test_kept_counts_cells_on_objects_for_importance_and_random(capsys):
    _script("demo_skills").main(["kept", "--scenes", "4", "--seeds", "1"])
    out = capsys.readouterr().out
    base = float(re.search(r"(\d+\.\d)% of all cells lie on an object", out)[1])
    assert 0 < base < 100
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| \d+\.\d%", line)]
    assert [row[1].strip() for row in rows] == ["importance", "random 0"] * 3
    for row in rows:
        assert 0 <= float(row[2].strip().rstrip("%")) <= 100
        assert len(row[3].split("/")) == 3  # small / medium / large


def test_prefill_counts_every_attention_unmerged_and_merged(capsys):
    """The counts the speed issue is judged by: one table per attention, vanilla and the three ratios."""
    _script("prefill").main(["--counts", "--backbone", "tiny", "--attn", "sdpa", "illava_packed", "--sizes", "224"])
    out = capsys.readouterr().out
    tables = out.split("**tiny, ")[1:]
    assert [t.split("**")[0] for t in tables] == ["sdpa", "illava_packed"]
    for text in tables:
        rows = [line for line in text.splitlines() if line.startswith("| 224x224")]
        assert [row.split("|")[3].strip() for row in rows] == [
            "vanilla",
            "iLLaVA 66.7%",
            "iLLaVA 77.8%",
            "iLLaVA 88.9%",
        ]
        vanilla_reads = int(rows[0].split("|")[6].split()[0])
        for row in rows[1:]:
            reads = int(row.split("|")[6].split()[0])
            assert reads <= vanilla_reads, row  # merging adds no host reads
    packed_calls = {int(row.split("|")[7]) for row in tables[1].splitlines() if row.startswith("| 224x224")}
    assert len(packed_calls) == 1  # the same number of attention calls merged and unmerged


def test_prefill_times_and_counts(capsys):
    argv = ["--backbone", "tiny", "--attn", "illava_packed", "--sizes", "224", "--repeats", "5", "--warmup", "0"]
    _script("prefill").main(argv)
    main, llm = capsys.readouterr().out.split("The LLM alone:")
    rows = [line.split("|") for line in main.splitlines() if line.startswith("| 224x224")]
    assert len(rows) == 4 and all(float(row[6].split()[0]) > 0 for row in rows)  # prefill ms
    zero_cost = [float(row[11].strip().rstrip("x")) for row in rows]  # speedup at zero merge cost
    assert zero_cost[0] == 1.0 and all(c > 0 for c in zero_cost)
    rows = [line.split("|") for line in llm.splitlines() if line.startswith("| 224x224")]
    assert [row[2].strip() for row in rows] == ["vanilla", "iLLaVA 66.7%", "iLLaVA 77.8%", "iLLaVA 88.9%"]
    assert [cell.strip() for cell in rows[0][4:7]] == ["1.00x"] * 3
    for row in rows[1:]:
        first, last = (int(n) for n in row[3].split("->"))
        assert last < first  # the merged decoder's later layers run shorter
        assert float(row[5].strip().rstrip("x")) > 1.0  # FLOPs predict a gain
        assert float(row[6].strip().rstrip("x")) > 0  # a timed figure (how much is the machine's to say)


def test_prefill_writes_each_table_to_markdown_and_can_skip_the_decoder_alone(tmp_path, capsys):
    out = tmp_path / "prefill.md"
    argv = ["--backbone", "tiny", "--attn", "sdpa", "--sizes", "224", "--repeats", "5", "--warmup", "0",
            "--no-llm-alone", "--markdown", str(out)]  # fmt: skip
    _script("prefill").main(argv)
    written = out.read_text()
    assert written.strip() == capsys.readouterr().out.strip()  # the same tables, appended as they came
    assert "**tiny, sdpa**" in written and "no image" in written and "The LLM alone" not in written


def test_merge_kernels_times_each_piece_beside_what_it_replaces(capsys):
    _script("merge_kernels").main(["--dtypes", "float32", "--repeats", "3"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| float32")]
    assert [row[1].strip() for row in rows] == ["16 x 64 tokens", "1 x 1024 tokens"]
    assert all(float(cell.split()[0]) > 0 for row in rows for cell in row[2:])  # explicit and SDPA ms
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| eager")] == ["eager"]
