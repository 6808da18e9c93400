import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest

import illava
from illava.schedule import Schedule
from optimizer import SearchSpace, SearchSpaceError, parse_range, schedule_params

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_parse_range_gives_a_value_or_a_pair():
    assert parse_range("0.5:0.95") == (0.5, 0.95)
    assert parse_range("0.778") == 0.778
    assert parse_range(" 1 : 3 ") == (1, 3) and all(isinstance(v, int) for v in parse_range("1:3"))
    assert parse_range("0:0.8") == (0, 0.8)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("a:b", "not a number"),
        ("0.1:0.2:0.3", "2 ':'"),
        ("", "not a number"),
        ("0.9:0.5", "low side"),
        ("inf", "finite"),
    ],
)
def test_parse_range_rejects_bad_text(text, says):
    with pytest.raises(SearchSpaceError, match=says):
        parse_range(text)


def test_space_round_trips_through_json():
    spaces = [
        SearchSpace(),
        SearchSpace(
            reduction=0.778,
            encoder_share=(0.2, 0.6),
            encoder_layer_count=2,
            llm_layer_count=(1, 2),
            group_size=(5,),
            methods=("illava", "prune"),
        ),
    ]
    for space in spaces:
        assert SearchSpace.from_json(space.to_json()) == space
        assert SearchSpace.from_dict(json.loads(json.dumps(space.to_dict()))) == space
    assert SearchSpace().to_dict()["reduction"] == [0.5, 0.95]
    assert spaces[1].to_dict()["reduction"] == 0.778


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"reduction": (0.5, 1.0)}, r"reduction .* must lie in \[0.0, 1.0\)"),
        ({"reduction": (0.9, 0.5)}, "low 0.9 above high 0.5"),
        ({"reduction": "0.5"}, "reduction must be a number"),
        ({"encoder_share": (0.0, 1.2)}, r"encoder_share .* must lie in \[0.0, 1.0\]"),
        ({"recycle_share": -0.1}, "recycle_share"),
        ({"encoder_layer_count": (0, 3)}, "encoder_layer_count .* must be >= 1"),
        ({"llm_layer_count": (1.0, 3)}, "llm_layer_count must be an integer"),
        ({"group_size": ()}, "group_size must be a non-empty list"),
        ({"group_size": (5, 5)}, "repeats a choice"),
        ({"methods": ("illava", "no-such-method")}, r"unknown methods \['no-such-method'\]"),
    ],
)
def test_bad_spaces_are_refused_with_the_field_named(fields, says):
    with pytest.raises(SearchSpaceError, match=says):
        SearchSpace(**fields)


def test_unknown_keys_are_refused():
    with pytest.raises(SearchSpaceError, match=r"unknown search space keys \['reductoin'\]"):
        SearchSpace.from_dict({"reductoin": 0.5})


def test_check_fits_names_the_short_stack():
    SearchSpace().check_fits(encoder_depth=3, llm_depth=4)
    with pytest.raises(SearchSpaceError, match="encoder has 2 blocks"):
        SearchSpace().check_fits(encoder_depth=2, llm_depth=28)
    with pytest.raises(SearchSpaceError, match=r"3-layer LLM has 2 layers .* \(0..1\)"):
        SearchSpace().check_fits(encoder_depth=32, llm_depth=3)


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_suggest_is_always_a_valid_fitting_schedule(sampler):
    space = SearchSpace(methods=("illava", "prune", "random"))
    chosen = {"random": optuna.samplers.RandomSampler(seed=0), "tpe": optuna.samplers.TPESampler(seed=0)}[sampler]
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=chosen)
    counts = set()
    for _ in range(80):
        trial = study.ask()
        # A tiny model: 3 encoder blocks and 4 decoder layers force layer collisions.
        schedule = space.suggest(trial, encoder_depth=3, llm_depth=4)
        schedule.check_fits(encoder_depth=3, llm_depth=4)
        assert 0.5 <= schedule.reduction <= 0.95 and 0.0 <= schedule.encoder_share <= 0.8
        assert list(schedule.encoder_layers) == sorted(set(schedule.encoder_layers))
        assert all(0 <= layer <= 2 for layer in schedule.llm_layers)
        assert len(schedule.encoder_layers) == trial.params["encoder_layer_count"]
        assert Schedule.from_dict(schedule.to_dict()) == schedule
        counts.add((len(schedule.encoder_layers), len(schedule.llm_layers)))
        study.tell(trial, [schedule.reduction, schedule.encoder_share])
    assert len(counts) > 3


def _replay(space, schedule, *, encoder_depth, llm_depth):
    study = optuna.create_study(directions=["minimize"] * 3, sampler=optuna.samplers.RandomSampler(seed=3))
    study.enqueue_trial(schedule_params(schedule, space))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # suggest must not leak Optuna's out-of-range warnings
        return space.suggest(study.ask(), encoder_depth=encoder_depth, llm_depth=llm_depth)


def test_schedule_params_reproduce_suggested_schedules():
    space = SearchSpace(methods=("illava", "prune"))
    study = optuna.create_study(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        schedule = space.suggest(trial, encoder_depth=16, llm_depth=6)
        assert _replay(space, schedule, encoder_depth=16, llm_depth=6) == schedule
        study.tell(trial, schedule.reduction)


@pytest.mark.parametrize(
    "schedule",
    [
        Schedule.vanilla(),
        Schedule.paper_default(7 / 9, encoder_depth=32, llm_depth=28),
        Schedule.paper_default(0.3, encoder_depth=32, llm_depth=28),  # reduction outside the space
        Schedule(reduction=0.9, encoder_share=1.0, encoder_layers=(0, 31), llm_layers=(26,), params={"group_size": 3}),
    ],
)
def test_schedule_params_reproduce_reference_schedules(schedule):
    assert _replay(SearchSpace(), schedule, encoder_depth=32, llm_depth=28) == schedule


def test_every_method_and_its_own_parameters_are_searched_conditionally():
    """Each method's trials draw its own parameters only, and replay through `schedule_params`."""
    space = SearchSpace(methods=tuple(m for m in illava.method_names() if m != "random"))
    study = optuna.create_study(directions=["minimize"], sampler=optuna.samplers.RandomSampler(seed=2))
    seen: dict[str, set[str]] = {}
    for _ in range(80):
        trial = study.ask()
        schedule = space.suggest(trial, encoder_depth=16, llm_depth=6)
        assert _replay(space, schedule, encoder_depth=16, llm_depth=6) == schedule
        seen.setdefault(schedule.method, set()).update(trial.params)
        study.tell(trial, schedule.reduction)
    assert set(seen) == set(space.methods)
    assert "contextual_share" in seen["visionzip"] and "recycle_ratio" in seen["sparsevlm"]
    assert "recycle_share" in seen["illava"] and "recycle_share" not in seen["visionzip"] | seen["fastv"]
    assert not {"encoder_share", "encoder_layer_count", "llm_layer_0"} & seen["divprune"]


def test_vanilla_draws_nothing_else():
    assert schedule_params(Schedule.vanilla(), SearchSpace()) == {"reduction": 0.0}


@pytest.mark.parametrize(
    ("schedule", "says"),
    [
        (Schedule(method="prune"), "method 'prune' is not among"),
        (Schedule(params={"group_size": 4}), "group_size 4 is not among"),
        (Schedule(encoder_share=0.0, encoder_layers=()), "at least one encoder block"),
        (Schedule(method="random", params={"seed": 3}), "seed 3 is not searched"),
        (Schedule(params={"text_guided": True}), "text_guided True is not searched \\(suggest always uses False\\)"),
    ],
)
def test_schedule_params_refuse_what_suggest_cannot_express(schedule, says):
    space = SearchSpace(methods=("illava", "random"))
    with pytest.raises(SearchSpaceError, match=says):
        schedule_params(schedule, space)


def test_suggest_refuses_a_model_too_shallow_for_the_space():
    study = optuna.create_study()
    with pytest.raises(SearchSpaceError, match="encoder has 1 blocks"):
        SearchSpace().suggest(study.ask(), encoder_depth=1, llm_depth=6)


def test_optimizer_imports_no_ray_db_jobs_or_profiler():
    code = (
        "import sys, optimizer; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'db', 'jobs', 'profiler'}))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert ast.literal_eval(out.strip()) == []


# ----------------------------------------------------------------------------------- several methods
PEER_SPACE_METHODS = ("illava", "fastv", "pdrop", "divprune", "random")


def test_a_space_of_several_methods_draws_only_what_each_method_uses():
    import optuna

    from illava.methods import get_method

    space = SearchSpace(methods=PEER_SPACE_METHODS)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["minimize"])
    seen = set()
    for _ in range(60):
        trial = study.ask()
        schedule = space.suggest(trial, encoder_depth=6, llm_depth=6)
        schedule.check_fits(encoder_depth=6, llm_depth=6)
        method = get_method(schedule.method)
        seen.add(schedule.method)
        if schedule.method in ("fastv", "pdrop"):
            assert (
                schedule.encoder_share == 0.0 and schedule.encoder_layers == () and "encoder_share" not in trial.params
            )
        if schedule.method == "fastv":
            assert len(schedule.llm_layers) == 1 and "llm_layer_count" not in trial.params
        if schedule.method == "divprune":
            assert schedule.encoder_share == 1.0 and schedule.llm_layers == () and "llm_layer_0" not in trial.params
        assert set(trial.params) & {"recycle_share", "group_size"} == (
            {"recycle_share", "group_size"} if schedule.method == "illava" else set()
        )
        assert method.check_schedule(schedule) == []
        study.tell(trial, 0.0)
    assert seen == set(PEER_SPACE_METHODS)


@pytest.mark.parametrize("method", ["fastv", "pdrop", "divprune"])
def test_seeds_of_a_peer_method_are_placed_where_it_acts_and_reproduce(method):
    import optuna

    from optimizer import seed_schedules

    space = SearchSpace(methods=(method,))
    seeds = seed_schedules(space, encoder_depth=6, llm_depth=6)
    assert seeds[0].removes_nothing and {s.method for s in seeds[1:]} == {method}
    study = optuna.create_study(directions=["minimize"])
    for seed in seeds:
        study.enqueue_trial(schedule_params(seed, space))
        trial = study.ask()
        assert space.suggest(trial, encoder_depth=6, llm_depth=6) == seed
        study.tell(trial, 0.0)
