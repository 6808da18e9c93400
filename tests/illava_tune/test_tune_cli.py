"""The tuning commands as a user types them: submit (background driver), jobs, status, pareto,
best among the candidates, publish, best, export, then the exported manifest applied to a model."""

import json

import pytest
import torch

import illava
import jobs
from db import Database
from illava.backbones import load_backbone
from illava.inputs import Sample, build_inputs, synthetic_image
from illava_tune.cli import main
from illava_tune.tune import wait_for


def test_submit_to_export_round_trip(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    (tmp_path / "w.yaml").write_text("name: cli\nimage_size: [224, 224]\nsamples: 2\noutput_tokens: 2\n")

    assert (
        main(["submit", "--backbone", "tiny", "--workload", "w.yaml", "--trials", "3", "--reduction", "0.6:0.9"]) == 0
    )
    job_id = capsys.readouterr().out.strip()
    assert wait_for(Database(url), job_id, timeout_s=300) == "completed"  # the detached driver ran it

    assert main(["jobs"]) == 0
    assert job_id[:12] in capsys.readouterr().out
    assert main(["status", job_id[:8]]) == 0
    assert "completed; 3/3 trials (0 failed)" in capsys.readouterr().out

    assert main(["pareto", job_id[:8], "--plot", str(tmp_path / "front.png")]) == 0
    front = capsys.readouterr().out
    assert "latency ms" in front and (tmp_path / "front.png").stat().st_size > 1000
    assert front.splitlines()[0].endswith(" float32/sdpa (dtype float32, attention sdpa)")  # what it was tuned in
    lines = front.splitlines()
    assert lines[1] == "memory: cpu tensor peak (measured, torch profiler)"  # what the memory column is
    rows = [line.split() for line in lines[lines.index(next(x for x in lines if x.startswith("---"))) + 1 :]]
    fastest_id, fastest_ms = int(rows[0][0]), float(rows[0][1])
    published = {row["id"]: row for row in jobs.front(Database(url), job_id)}
    assert rows[0][2] == f"{published[fastest_id]['speedup']:.2f}x"  # the paired speedup, then its range

    # A speedup target: the most accurate schedule at least that much faster than the job's unmerged model.
    slowest = min(row["speedup"] for row in published.values())
    assert main(["best", "--backbone", "tiny", "--candidates", "--speedup", str(slowest)]) == 0
    out = capsys.readouterr().out
    most_accurate = max((row for row in published.values() if row["speedup"] >= slowest),
                        key=lambda row: (row["quality"], -row["memory_mib"], row["speedup"]))  # fmt: skip
    assert f"at least {slowest:.2f}x faster than unmerged: #{most_accurate['id']}" in out
    fastest_speedup = max(published.values(), key=lambda row: row["speedup"])
    assert main(["best", "--backbone", "tiny", "--candidates", "--speedup", str(fastest_speedup["speedup"] + 5)]) == 0
    out = capsys.readouterr().out
    assert f"no schedule is {fastest_speedup['speedup'] + 5:.2f}x faster than the unmerged model" in out
    assert f"the fastest is #{fastest_speedup['id']} at {fastest_speedup['speedup']:.2f}x, 5.00x short" in out

    # Deployments are given published schedules only: none yet, and the error says how to get one.
    assert main(["best", "--backbone", "tiny", "--latency-ms", str(fastest_ms + 0.5)]) == 2
    err = capsys.readouterr().err
    assert f"no published schedules for backbone 'tiny'; {len(published)} candidate schedule" in err
    assert "illava-tune publish ID" in err
    assert main(["publish", str(fastest_id)]) == 0
    assert f"published schedule #{fastest_id}" in capsys.readouterr().out
    assert main(["best", "--backbone", "tiny", "--latency-ms", str(fastest_ms + 0.5)]) == 0  # the table rounds to 0.1
    assert f"best schedule under {fastest_ms + 0.5:.1f} ms: #{fastest_id} (export:" in capsys.readouterr().out
    assert main(["best", "--backbone", "tiny", "--latency-ms", str(fastest_ms / 10)]) == 0
    assert f"the fastest is #{fastest_id}" in capsys.readouterr().out  # unmet target: the gap is reported
    assert main(["pareto", job_id[:8], "--plot", str(tmp_path / "front.png")]) == 0
    assert "[published]" in capsys.readouterr().out

    assert main(["export", str(fastest_id), "--format", "json", "-o", "manifest.json"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["backbone"]["name"] == "tiny" and manifest["provenance"]["job"] == job_id
    assert manifest["workload"]["name"] == "cli" and manifest["metrics"]["prefill_s"]["median"] > 0
    reference = manifest["reference"]  # what the speedup was measured against
    assert reference["model"] == "unmerged" and reference["job_objective"] == "speedup"
    assert reference["prefill_ms"] == manifest["metrics"]["reference_prefill_s"]["median"] * 1000
    assert reference["speedup"]["median"] == pytest.approx(published[fastest_id]["speedup"])
    assert main(["export", str(fastest_id), "--format", "yaml"]) == 0
    assert "schedule:" in capsys.readouterr().out

    backbone = load_backbone("tiny")
    illava.apply(backbone.model, manifest)  # a deployment applies the manifest as it is
    batch = build_inputs(backbone, [Sample("<image> hi", [synthetic_image(224, 1)])])
    with torch.no_grad():
        backbone.model(**batch)
    expected = illava.Schedule.from_dict(manifest["schedule"]).plan(64)
    assert int(illava.last_stats(backbone.model).llm_image_tokens[-1]) == expected.llm_tokens_at(5)


def test_db_check_says_what_to_run(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert main(["db", "check", "--database", url]) == 2
    assert "illava-tune db upgrade" in capsys.readouterr().err
    assert main(["db", "upgrade", "--database", url]) == 0
    assert main(["db", "check", "--database", url]) == 0


def test_status_of_an_unknown_job_is_a_clear_error(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["db", "upgrade", "--database", url]) == 0
    assert main(["status", "feedbeef", "--database", url]) == 2
    assert "feedbeef" in capsys.readouterr().err


def test_pareto_marks_schedules_whose_speedups_the_measurement_cannot_tell_apart():
    from illava_tune.tune import format_front

    def row(ident, speedup, low, high, quality):
        return {"id": ident, "schedule": illava.Schedule.vanilla().to_dict(), "latency_ms": 10.0, "memory_mib": 20.0,
                "accuracy": quality, "retention": None, "fidelity": None, "quality": quality, "speedup": speedup,
                "speedup_low": low, "speedup_high": high, "memory_source": "cpu tensor peak (measured, torch profiler)",
                "hardware": "cpu:x", "dtype": "float32", "attention": "sdpa"}  # fmt: skip

    table = format_front([row(1, 1.02, 0.67, 1.15, 0.86), row(2, 1.03, 0.82, 1.23, 0.64), row(3, 1.6, 1.5, 1.7, 0.5)])
    lines = table.splitlines()
    assert lines[:2] == [
        "tuned on cpu:x (dtype float32, attention sdpa)",
        "memory: cpu tensor peak (measured, torch profiler)",
    ]
    marks = {line.split()[0]: line.rsplit("unmerged", 1)[1].strip() for line in lines[4:]}
    assert marks == {"1": "~#2", "2": "~#1", "3": ""}  # 1 and 2 overlap; 3 is measurably faster than both
    assert "1.02x (0.67-1.15)" in lines[4]
