"""The commands on every family, as the engine issue asks: profile and submit on the built-in tiny
models of each family and on a local checkpoint directory of one; unsupported checkpoints and
schedules a family cannot run fail before any work."""

from __future__ import annotations

import json

import pytest

from illava.backbones import load_backbone, save_backbone
from illava_tune.cli import main


@pytest.mark.parametrize("backbone", ["tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-llava-onevision"])
def test_profile_runs_on_every_family(backbone, capsys, tmp_path):
    out_json = tmp_path / "result.json"
    argv = ["profile", "--backbone", backbone, "--reduction", "0.778", "--limit", "2", "--repeats", "1",
            "--warmup", "0", "--quiet", "--json", str(out_json)]  # fmt: skip
    assert main(argv) == 0
    assert f"backbone {backbone}" in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["result"]["image_tokens_to_llm"] < data["reference"]["image_tokens_to_llm"]
    assert data["result"]["tokens_per_llm_layer"] < data["reference"]["tokens_per_llm_layer"]


def test_submit_waits_for_a_job_on_llava_onevision(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.yaml").write_text("name: small\nimage_size: [224, 224]\nsamples: 2\noutput_tokens: 2\n")
    argv = ["submit", "--backbone", "tiny-llava-onevision", "--workload", "w.yaml", "--trials", "4", "--wait",
            "--database", f"sqlite:///{tmp_path / 'j.db'}"]  # fmt: skip
    import ray

    try:
        assert main(argv) == 0  # runs the driver in this process, on a local Ray
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    # (the unmerged seed is on the front only when no merged trial matches its quality faster: noise decides)
    assert "completed" in out and "illava r=" in out and "tuned on cpu:" in out


def test_a_local_checkpoint_of_another_family_profiles(capsys, tmp_path):
    path = save_backbone(load_backbone("tiny-qwen2-vl"), tmp_path / "qwen2-vl")
    argv = ["profile", "--backbone", str(path), "--reduction", "0.667", "--limit", "1", "--repeats", "1",
            "--warmup", "0", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "speedup" in capsys.readouterr().out


def test_an_unsupported_checkpoint_is_refused_at_submit(capsys, tmp_path):
    (tmp_path / "blip").mkdir()
    (tmp_path / "blip" / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    argv = ["submit", "--backbone", str(tmp_path / "blip"), "--database", f"sqlite:///{tmp_path / 'j.db'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model_type 'blip-2' is not supported" in err and "qwen2_5_vl" in err and "llava_onevision" in err


def test_a_video_workload_on_a_family_that_merges_videos_in_the_llm_only(capsys, tmp_path):
    import jobs
    from db import Database
    from optimizer import SearchSpace

    db = f"sqlite:///{tmp_path / 'j.db'}"
    argv = ["submit", "--backbone", "tiny-llava-onevision", "--workload", "video-16", "--database", db]
    assert main(argv) == 2
    assert "--encoder-share 0" in capsys.readouterr().err
    database = Database(db)
    job = jobs.submit(database, backbone="tiny-llava-onevision", workload="video-16", n_trials=2,
                      space=SearchSpace(encoder_share=0))  # fmt: skip
    assert jobs.status(database, job).state == "queued"  # accepted; not run here
