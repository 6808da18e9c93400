import argparse
import json
import re

from illava import PAPER_REDUCTIONS, Schedule
from illava_tune.cli import main


def test_demo_prints_one_row_per_schedule_with_planned_counts(capsys):
    assert main(["demo", "--backbone", "tiny", "--image-size", "224", "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("vanilla", "iLLaVA"))]
    assert [row[0] for row in rows] == ["vanilla", "iLLaVA", "iLLaVA", "iLLaVA"]
    assert rows[0][1:3] == ["64", "64"]  # 224x224 -> 8x8 LLM tokens, nothing merged
    for row, reduction in zip(rows[1:], PAPER_REDUCTIONS):
        plan = Schedule.paper_default(reduction, encoder_depth=6, llm_depth=6).plan(64)
        assert row[2:4] == [str(plan.after_encoder), str(plan.kept)]
        assert float(row[-2].rstrip("x")) > 0 and float(row[-1].rstrip("x")) > 1.0  # measured and predicted speedups


def test_unknown_backbone_is_a_clear_error(capsys, tmp_path):
    assert main(["demo", "--backbone", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "illava-tune: error:" in err and "tiny" in err and "small" in err


def test_profile_prints_the_comparison_and_writes_json(capsys, tmp_path):
    out_json = tmp_path / "result.json"
    argv = ["profile", "--backbone", "tiny", "--reduction", "0.889", "--limit", "2", "--repeats", "2",
            "--warmup", "0", "--quiet", "--json", str(out_json)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "prefill ms (median)" in out and "greedy match rate" in out and "workload single-448" in out
    data = json.loads(out_json.read_text())
    assert data["reference"]["schedule"]["reduction"] == 0.0
    assert data["result"]["schedule"]["reduction"] == 0.889
    assert data["result"]["image_tokens_to_llm"] < data["reference"]["image_tokens_to_llm"]


def test_profile_defaults_to_the_trained_demo_backbone_scored_on_its_benchmark(capsys, tmp_path):
    out_json = tmp_path / "result.json"
    argv = ["profile", "--limit", "3", "--repeats", "1", "--warmup", "0", "--quiet", "--json", str(out_json)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "backbone demo" in out and "workload demo-vqa" in out
    data = json.loads(out_json.read_text())
    # Labelled questions: accuracy is measured (a synthetic workload leaves it None); the first three
    # test questions are answered right unmerged (test_demo_backbone pins the first 100 at 85%).
    assert data["reference"]["accuracy"] == 1.0
    assert data["result"]["accuracy"] is not None


def test_submit_defaults_to_the_demo_backbone_and_its_labelled_workload():
    from illava_tune.cli import build_parser
    from illava_tune.tune import workload_for

    args = build_parser().parse_args(["submit"])
    assert args.backbone == "demo"
    workload = workload_for(args.backbone, args.workload, dataset=args.dataset, limit=args.limit)
    assert workload.name == "demo-vqa" and workload.dataset == "demo"


def test_profile_rejects_an_unknown_workload_before_loading_anything(capsys):
    assert main(["profile", "--backbone", "tiny", "--workload", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert "unknown workload 'no-such-preset'" in err and "single-448" in err


def test_hardware_prints_the_detected_profile(capsys):
    assert main(["hardware", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "kind" in out and "cpu" in out and "torch" in out


def test_the_method_options_name_every_registered_method():
    """The CLI stays light (no illava import to build its parser), so its lists are written out; this
    holds them to the registry."""
    from illava import method_names
    from illava_tune.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    texts = {
        "submit --methods": next(a.help for a in commands["submit"]._actions if "--methods" in a.option_strings),
        "profile --method": next(a.help for a in commands["profile"]._actions if "--method" in a.option_strings),
    }
    for where, text in texts.items():
        missing = [m for m in method_names() if m not in re.findall(r"[\w-]+", text)]
        assert not missing, f"{where} help does not name {missing}"
