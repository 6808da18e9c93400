"""The deployment configuration is part of what is tuned: a job submitted with --dtype and --attn
measures in them, records them in its hardware group and its trials' metrics, `best` filters on
them (and refuses to compare latencies across groups), and the exported manifest says what it was
tuned in, which `illava.apply` checks against the model it is applied to."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

import illava
from db import Database, queries
from illava.backbones import load_backbone
from illava_tune import cli
from illava_tune.cli import main


@pytest.fixture
def two_jobs(tmp_path, monkeypatch, capsys):
    """One job in bfloat16 with the packed attention, one in the defaults (float32, sdpa)."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'rt.db'}"
    (tmp_path / "w.yaml").write_text("name: rt\nimage_size: [224, 224]\nsamples: 1\noutput_tokens: 2\n")
    import ray

    ids = []
    try:
        for extra in (["--dtype", "bfloat16", "--attn", "illava_packed"], []):
            argv = ["submit", "--backbone", "tiny", "--workload", "w.yaml", "--trials", "2", "--reduction", "0.778",
                    "--wait", "--database", url, *extra]  # fmt: skip
            assert main(argv) == 0
            ids.append(capsys.readouterr().out.splitlines()[0])
    finally:
        ray.shutdown()
    return Database(url), url, ids


def test_a_job_records_its_dtype_and_attention_and_best_filters_on_them(two_jobs, capsys, tmp_path):
    database, url, (packed_job, default_job) = two_jobs
    with database.session() as s:
        packed, default = (queries.get_job(s, job) for job in (packed_job, default_job))
        assert (packed.hardware.profile["dtype"], packed.hardware.profile["attention"]) == ("bfloat16", "illava_packed")
        assert packed.hardware.key.endswith(" bfloat16/illava_packed")
        assert default.hardware.key.endswith(" float32/sdpa") and default.hardware_id != packed.hardware_id
        for trial in queries.list_trials(s, packed):  # every measurement says what it ran in
            assert trial.state == "complete", trial.error
            assert (trial.metrics["hardware"]["dtype"], trial.metrics["hardware"]["attention"]) == (
                "bfloat16",
                "illava_packed",
            )

    assert main(["best", "--backbone", "tiny", "--candidates", "--latency-ms", "1e6", "--database", url]) == 2
    err = capsys.readouterr().err
    assert "2 hardware groups" in err and "bfloat16/illava_packed" in err and "float32/sdpa" in err

    assert (
        main(
            [
                "best",
                "--backbone",
                "tiny",
                "--candidates",
                "--latency-ms",
                "1e6",
                "--dtype",
                "bfloat16",
                "--database",
                url,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "bfloat16/illava_packed (dtype bfloat16, attention illava_packed)" in out and "float32/sdpa" not in out
    chosen = int(re.search(r"best schedule under [\d.]+ ms: #(\d+)", out)[1])
    assert (
        main(["best", "--backbone", "tiny", "--candidates", "--latency-ms", "1e6", "--attn", "sdpa", "--database", url])
        == 0
    )
    assert "float32/sdpa (dtype float32, attention sdpa)" in capsys.readouterr().out
    assert (
        main(
            [
                "best",
                "--backbone",
                "tiny",
                "--candidates",
                "--latency-ms",
                "1e6",
                "--dtype",
                "float16",
                "--database",
                url,
            ]
        )
        == 2
    )
    assert "no schedules for backbone 'tiny', dtype float16" in capsys.readouterr().err

    assert main(["pareto", packed_job[:8], "--plot", str(tmp_path / "p.png"), "--database", url]) == 0
    assert capsys.readouterr().out.startswith("tuned on cpu:")

    assert main(["export", str(chosen), "-o", "m.json", "--database", url]) == 0
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert (manifest["hardware"]["dtype"], manifest["hardware"]["attention"]) == ("bfloat16", "illava_packed")

    deployed = load_backbone("tiny", dtype=torch.bfloat16, attn_implementation="illava_packed").model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        illava.apply(deployed, manifest)  # what it was tuned in: silent
    other = load_backbone("tiny").model
    with pytest.warns(illava.RuntimeMismatchWarning, match="tuned in bfloat16 with illava_packed attention, and the "
                      "model runs in float32 with sdpa"):  # fmt: skip
        illava.apply(other, manifest)
    assert illava.is_applied(other)  # a warning, not a refusal: the schedule still fits


def test_flags_are_checked_before_any_job_exists(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["submit", "--backbone", "tiny", "--attn", "flash_attention_2", "--database", url]) == 2
    err = capsys.readouterr().err
    if not torch.cuda.is_available():
        assert "runs on CUDA only" in err
    with pytest.raises(SystemExit):
        main(["submit", "--backbone", "tiny", "--dtype", "int8", "--database", url])
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    with Database(url).session() as s:
        assert queries.list_jobs(s) == []


def test_the_parsers_choices_are_the_engines():
    assert tuple(illava.DTYPES) == cli.DTYPES and cli.ATTENTIONS == illava.ATTENTIONS


def test_the_backbone_help_names_every_built_in():
    """The parser imports no torch, so its help lists the built-ins itself: a family added later fails
    here until its tiny config is named there too."""
    from illava.backbones import builtin_names

    listed = {name.strip(" ,;()") for name in cli.BACKBONE_HELP.replace("(", " ").split()}
    assert set(builtin_names()) <= listed


def test_hardware_prints_the_key_best_takes(capsys):
    assert main(["hardware", "--device", "cpu", "--dtype", "bfloat16", "--attn", "illava_packed"]) == 0
    out = capsys.readouterr().out
    assert (
        "dtype        bfloat16" in out and " bfloat16/illava_packed  (what `illava-tune best --hardware` takes)" in out
    )
