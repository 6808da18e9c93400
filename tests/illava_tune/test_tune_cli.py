"""The tuning commands as a user types them: submit (background driver), jobs, status, pareto,
best, export, then the exported manifest applied to a model."""

import json

import torch

import illava
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
        main(["submit", "--backbone", "tiny", "--workload", "w.yaml", "--trials", "4", "--reduction", "0.6:0.9"]) == 0
    )
    job_id = capsys.readouterr().out.strip()
    assert wait_for(Database(url), job_id, timeout_s=300) == "completed"  # the detached driver ran it

    assert main(["jobs"]) == 0
    assert job_id[:12] in capsys.readouterr().out
    assert main(["status", job_id[:8]]) == 0
    assert "completed; 4/4 trials (0 failed)" in capsys.readouterr().out

    assert main(["pareto", job_id[:8], "--plot", str(tmp_path / "front.png")]) == 0
    front = capsys.readouterr().out
    assert "latency ms" in front and (tmp_path / "front.png").stat().st_size > 1000
    assert front.splitlines()[0].endswith(" float32/sdpa (dtype float32, attention sdpa)")  # what it was tuned in
    rows = [line.split() for line in front.splitlines()[3:]]
    fastest_id, fastest_ms = int(rows[0][0]), float(rows[0][1])

    assert main(["best", "--backbone", "tiny", "--latency-ms", str(fastest_ms + 0.5)]) == 0  # the table rounds to 0.1
    assert "best schedule under" in capsys.readouterr().out
    assert main(["best", "--backbone", "tiny", "--latency-ms", str(fastest_ms / 10)]) == 0
    assert f"the fastest is #{fastest_id}" in capsys.readouterr().out  # unmet target: the gap is reported

    assert main(["export", str(fastest_id), "--format", "json", "-o", "manifest.json"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["backbone"]["name"] == "tiny" and manifest["provenance"]["job"] == job_id
    assert manifest["workload"]["name"] == "cli" and manifest["metrics"]["prefill_s"]["median"] > 0
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
