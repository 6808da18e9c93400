"""Tuning jobs end to end on the `tiny` backbone, a real local Ray cluster and real databases."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import optuna
import pytest
import torch

import illava
import jobs
from db import Database, queries
from illava import Schedule
from illava.backbones import backbone_config
from jobs.worker import TrialWorker
from optimizer import EXPLORE_ROLE, SEED_ATTR, Constraints, GuidedSearch, SearchSpace, SpeedModel
from tests.db.conftest import fresh_database

WORKLOAD = "single-448"
N_TRIALS = 6


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def small_workload(tmp_path: Path) -> Path:
    path = tmp_path / "workload.yaml"
    path.write_text("name: tiny-e2e\nimages_per_sample: 1\nimage_size: [224, 224]\nsamples: 2\noutput_tokens: 2\n")
    return path


def submit(database: Database, tmp_path: Path, **overrides) -> str:
    database.upgrade()
    fields = dict(backbone="tiny", workload=small_workload(tmp_path), n_trials=N_TRIALS, n_workers=2,
                  space=SearchSpace(reduction=(0.5, 0.95)), constraints=Constraints(), sampler="tpe", seed=0)  # fmt: skip
    fields.update(overrides)
    return jobs.submit(database, **fields)


def stored_trials(database: Database, job_id: str):
    with database.session() as s:
        return queries.list_trials(s, queries.get_job(s, job_id))


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_job_runs_end_to_end_and_publishes_optunas_front(backend, tmp_path):
    with fresh_database(backend, tmp_path) as database:
        job_id = submit(database, tmp_path)
        assert jobs.run(database, job_id) == "completed"
        trials = stored_trials(database, job_id)
        assert sorted(t.number for t in trials) == list(range(N_TRIALS))  # every trial stored once
        assert all(t.state == "complete" for t in trials)
        assert any(t.schedule["reduction"] == 0.0 for t in trials)  # the study starts from the unmerged model
        front = jobs.front(database, job_id)
        assert front and all(r["speedup"] is not None and r["memory_source"] for r in front)
        points = [(-r["speedup"], r["memory_mib"], -r["quality"]) for r in front]  # the default objective
        for a in points:  # non-dominated
            assert not any(all(x <= y for x, y in zip(b, a)) and b != a for b in points)
        study = optuna.load_study(study_name=f"illava-{job_id}", storage=database.optuna_storage_url)
        assert study.metric_names == ["speedup", "memory_mib", "quality"]
        by_trial = {t.number: t for t in trials}
        with database.session() as s:
            published = {
                p.trial_id for p in queries.find_schedules(s, backbone="tiny", status="candidate") if p.job_id == job_id
            }
        assert published  # the front is stored as the job's candidates
        # Optuna's front, less the points another beats on speed and quality within the memory noise.
        assert published <= {by_trial[t.number].id for t in study.best_trials}
        status = jobs.status(database, job_id)
        p = status.progress
        assert (status.state, p.done, p.total, p.front_size) == ("completed", N_TRIALS, N_TRIALS, len(front))


def test_failing_and_crashing_trials_are_recorded_and_the_job_completes(tmp_path, monkeypatch):
    monkeypatch.setenv("ILLAVA_TUNE_FAULTS", "raise:2,crash:3,unranked:4")
    database = Database(f"sqlite:///{tmp_path / 'faults.db'}")
    job_id = submit(database, tmp_path)
    assert jobs.run(database, job_id) == "completed"
    trials = {t.number: t for t in stored_trials(database, job_id)}
    assert len(trials) == N_TRIALS
    assert trials[2].state == "failed" and "injected fault in trial 2" in trials[2].error
    assert trials[3].state == "failed" and "worker died" in trials[3].error
    assert trials[4].state == "failed" and "cannot be ranked" in trials[4].error and "speedup" in trials[4].error
    assert trials[4].metrics is not None  # what was measured is kept
    assert sum(t.state == "complete" for t in trials.values()) == N_TRIALS - 3
    assert jobs.status(database, job_id).progress.failed == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backbone": "no-such-model"}, "unknown backbone 'no-such-model'"),
        ({"workload": "no-such-workload"}, "unknown workload 'no-such-workload'"),
        ({"constraints": None, "n_trials": 0}, "--trials must be >= 1"),
        ({"sampler": "grid"}, "unknown sampler 'grid'"),
        ({"space": SearchSpace(reduction=(0.5, 0.95), encoder_layer_count=(1, 9))}, "encoder"),
    ],
)
def test_bad_input_fails_before_any_job_exists(tmp_path, overrides, message):
    database = Database(f"sqlite:///{tmp_path / 'bad.db'}")
    with pytest.raises(ValueError, match=message):
        submit(database, tmp_path, **overrides)
    with database.session() as s:
        assert queries.list_jobs(s) == []


def test_an_impossible_constraint_is_refused():
    with pytest.raises(ValueError, match="min_retention"):
        Constraints(min_retention=1.5)


def test_a_cancelled_job_stops_between_trials(tmp_path):
    import threading

    database = Database(f"sqlite:///{tmp_path / 'cancel.db'}")
    job_id = submit(database, tmp_path, n_trials=40, n_workers=1)
    result = {}
    driver = threading.Thread(target=lambda: result.setdefault("state", jobs.run(database, job_id)))
    driver.start()
    deadline = time.monotonic() + 120
    while sum(t.state == "complete" for t in stored_trials(database, job_id)) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    jobs.cancel(database, job_id)
    driver.join(timeout=60)
    assert not driver.is_alive() and result["state"] == "cancelled"
    trials = stored_trials(database, job_id)
    assert len(trials) < 40 and all(t.state in ("complete", "failed") for t in trials)
    assert jobs.status(database, job_id).state == "cancelled"
    study = optuna.load_study(study_name=f"illava-{job_id}", storage=database.optuna_storage_url)
    in_optuna = study.get_trials(deepcopy=False)  # every trial finished in Optuna too, none left waiting
    assert len(in_optuna) == len(trials) and all(t.state.is_finished() for t in in_optuna)
    with pytest.raises(ValueError, match="already cancelled"):
        jobs.cancel(database, job_id)


def test_a_workload_file_that_does_not_parse_fails_before_any_job_exists(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    database = Database(f"sqlite:///{tmp_path / 'broken.db'}")
    with pytest.raises(ValueError, match="broken.yaml"):
        submit(database, tmp_path, workload=broken)
    with database.session() as s:
        assert queries.list_jobs(s) == []


def test_a_job_searching_peer_methods_stores_each_trials_method_and_its_manifests_apply(tmp_path):
    """Every trial row stores the schedule Optuna's parameters for it make (its method and that
    method's parameters), and every completed trial -- on the front or not -- exports, the way a user
    does it (`publish --job --trial`, then `export`), a manifest that `illava.apply` accepts on a
    fresh model, which then runs a forward with the counts the plan says."""
    from optuna.trial import FixedTrial

    from illava.backbones import load_backbone
    from illava.inputs import Sample, build_inputs, synthetic_image
    from tests.illava.test_contract import segment_plans

    database = Database(f"sqlite:///{tmp_path / 'methods.db'}")
    peers = ("fastv", "pdrop", "divprune", "visionzip", "sparsevlm", "tome", "downsample")
    space = SearchSpace(reduction=0.778, methods=peers)
    job_id = submit(database, tmp_path, space=space, n_trials=9)  # 2 seeds + 7 draws, one per method
    assert jobs.run(database, job_id) == "completed"
    trials = stored_trials(database, job_id)
    assert all(t.state == "complete" for t in trials), [t.error for t in trials]
    merged = [illava.Schedule.from_dict(t.schedule) for t in trials if t.schedule["reduction"] > 0]
    assert {s.method for s in merged} == set(peers)
    for schedule in merged:  # each on the stages its method acts at
        assert illava.get_method(schedule.method).check_schedule(schedule) == []

    study = optuna.load_study(study_name=f"illava-{job_id}", storage=database.optuna_storage_url)
    asked = {t.number: t.params for t in study.get_trials(deepcopy=False)}
    encoder_depth, llm_depth = illava.depths(backbone_config("tiny"))
    sample = Sample("<image> What is in the picture?", [synthetic_image(224, 1)])
    for trial in trials:
        with warnings.catch_warnings():  # the enqueued seeds lie outside the searched range on purpose
            warnings.filterwarnings("ignore", message=r"The value .* is out of the range", category=UserWarning)
            schedule = space.suggest(FixedTrial(asked[trial.number]), encoder_depth=encoder_depth, llm_depth=llm_depth)
        stored = trial.schedule
        assert (stored["method"], stored["params"]) == (schedule.method, schedule.params.to_dict()), trial.number
        assert stored == schedule.to_dict(), trial.number

        row = jobs.publish(database, job=job_id, trial=trial.number)  # what `illava-tune publish --job --trial` does
        manifest = jobs.manifest(database, row["id"])  # what `illava-tune export` writes
        assert manifest["schedule"] == stored and manifest["provenance"]["trial"] == trial.id
        assert manifest["backbone"]["name"] == "tiny" and manifest["metrics"] == trial.metrics
        backbone = load_backbone("tiny")  # a fresh model, as a deployment has
        batch = build_inputs(backbone, [sample], schedule=schedule)  # downsample: the image resized
        with warnings.catch_warnings():
            warnings.simplefilter("error" if schedule.method != "downsample" else "ignore", illava.DownsampleWarning)
            illava.apply(backbone.model, manifest)
        with torch.no_grad():
            assert torch.isfinite(backbone.model(**batch).logits).all()
        if schedule.method != "downsample" and not schedule.removes_nothing:
            plans = segment_plans(backbone, batch, schedule)
            assert int(illava.last_stats(backbone.model).llm_image_tokens[-1]) == sum(plan.kept for plan in plans)


def test_a_job_runs_its_seeds_then_guided_draws_within_its_budget_and_a_resume_goes_on(tmp_path):
    """5 trials of a range holding none of the paper's ratios: its 2 seeds (the unmerged model, the
    paper default at the middle), then 3 exploration draws (`optimizer.GuidedSearch`), each under its
    role in Optuna and each the guide's draw with the speed model fitted on every trial before it. A
    driver stopped after the first draw is resumed: the next draws go on from the study, and no seed
    runs twice."""
    database = Database(f"sqlite:///{tmp_path / 'guided.db'}")
    job_id = submit(database, tmp_path, n_trials=5, n_workers=1, space=SearchSpace(reduction=(0.7, 0.76)))

    def stop_after_the_first_draw(progress: jobs.Progress) -> None:
        if progress.done == 3:
            raise RuntimeError("stopped for the test")

    with pytest.raises(RuntimeError, match="stopped for the test"):
        jobs.run(database, job_id, on_progress=stop_after_the_first_draw)
    assert jobs.status(database, job_id).state == "failed"
    assert jobs.run(database, job_id) == "completed"

    trials = {t.number: t for t in stored_trials(database, job_id)}
    study = optuna.load_study(study_name=f"illava-{job_id}", storage=database.optuna_storage_url)
    roles = {t.number: t.user_attrs.get(SEED_ATTR) for t in study.get_trials(deepcopy=False)}
    assert sorted(trials) == sorted(roles) == list(range(5))  # the budget: no trial beyond it, none pruned
    assert all(t.state.is_finished() for t in study.get_trials(deepcopy=False))  # none left waiting
    assert roles == {0: "unmerged", 1: "paper_default@0.73", 2: EXPLORE_ROLE, 3: EXPLORE_ROLE, 4: EXPLORE_ROLE}
    assert all(trials[n].state == "complete" for n in range(5))

    # Each draw is the guide's: the FLOPs model on the worker's first batch plus the per-merge cost
    # fitted on the trials measured before it (a draw predicted faster than the unmerged model, or
    # the fastest predicted where merges cost this CPU too much for any to be).
    with database.session() as s:
        job = queries.get_job(s, job_id)
        space, workload = SearchSpace.from_dict(job.search_space), job.workload.spec
    config = backbone_config("tiny")
    encoder_depth, llm_depth = illava.depths(config)
    grids, text_tokens = TrialWorker("tiny", workload, device="cpu", repeats=1, warmup=0).flop_inputs()
    guide = GuidedSearch(space, encoder_depth=encoder_depth, llm_depth=llm_depth, seed=0,
                         flops_speedup=lambda schedule: illava.predicted_speedup(config, schedule, grids, text_tokens))  # fmt: skip
    for n in range(2, 5):
        model = SpeedModel.fit(guide.flops_speedup, [(Schedule.from_dict(trials[m].schedule), trials[m].speedup)
                                                     for m in range(n)])  # fmt: skip
        assert model.fitted_on == n - 1  # every merged trial before it
        assert trials[n].schedule == guide.draw(model, n).to_dict()
