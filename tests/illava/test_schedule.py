import json

import pytest

from illava import PAPER_REDUCTIONS, Schedule, ScheduleError
from illava.schedule import map_layers


@pytest.mark.parametrize("reduction", PAPER_REDUCTIONS)
@pytest.mark.parametrize("n_tokens", [1, 7, 64, 256, 576, 1296])
def test_plan_identity_and_counts(reduction, n_tokens):
    plan = Schedule(reduction=reduction).plan(n_tokens)
    assert plan.kept == n_tokens - plan.encoder_removed - plan.llm_removed
    assert plan.kept >= 1
    assert plan.kept == n_tokens - min(int(reduction * n_tokens + 1e-9), n_tokens - 1)
    tokens = n_tokens
    for step in plan.encoder + plan.llm:  # each step starts where the previous one ended
        assert step.tokens_in == tokens
        assert 0 <= step.recycled <= min(step.removed, step.kept)
        tokens = step.kept
    assert tokens == plan.kept


def test_paper_default_on_the_7b_model_is_the_paper():
    schedule = Schedule.paper_default(8 / 9)
    assert schedule.encoder_layers == (5, 9, 13) and schedule.llm_layers == (2, 8, 14)
    plan = schedule.plan(256)
    # 227 removed, 40% (91) in the encoder, evenly over three layers.
    assert [s.removed for s in plan.encoder] == [31, 30, 30]
    assert [s.removed for s in plan.llm] == [46, 45, 45]
    assert plan.kept == 29
    # Divisible counts give the paper's literal identity N - Rv*Bv - Rt*Bt.
    even = Schedule(reduction=0.75, encoder_share=0.5).plan(288)  # 216 removed: 108 + 108
    assert even.kept == 288 - 36 * 3 - 36 * 3


def test_paper_default_maps_layers_proportionally():
    assert Schedule.paper_default(encoder_depth=16, llm_depth=16).encoder_layers == (2, 4, 6)  # floor(l * 16 / 32)
    assert Schedule.paper_default(encoder_depth=16, llm_depth=16).llm_layers == (1, 4, 8)  # floor(l * 16 / 28)
    assert Schedule.paper_default(encoder_depth=32, llm_depth=36).llm_layers == (2, 10, 18)  # Qwen2.5-VL 3B
    shallow = Schedule.paper_default(encoder_depth=4, llm_depth=4)
    assert shallow.encoder_layers == (0, 1, 2) and shallow.llm_layers == (0, 1, 2)  # collisions pushed apart
    with pytest.raises(ScheduleError, match="cannot place 3 merge layers"):
        map_layers((2, 8, 14), 28, 3, max_index=1)


def test_llm_tokens_at_and_encoder_tokens_at():
    plan = Schedule(reduction=0.5, encoder_layers=(1,), llm_layers=(2,)).plan(100)
    assert plan.encoder_tokens_at(0) == (100, 100)
    assert plan.encoder_tokens_at(1) == (100, 80)  # attention before the merge, FFN after
    assert plan.encoder_tokens_at(2) == (80, 80)
    assert [plan.llm_tokens_at(layer) for layer in range(4)] == [80, 80, 80, 50]


def test_json_round_trip():
    schedule = Schedule(method="illava", reduction=0.5, encoder_layers=[1, 3], llm_layers=[2], params={"group_size": 3})
    text = schedule.to_json()
    data = json.loads(text)
    assert data["schema_version"] == 2 and data["params"] == {"recycle_share": 0.1, "group_size": 3}
    assert Schedule.from_json(text) == schedule
    assert Schedule.coerce({"schedule": schedule.to_dict(), "backbone": "x"}) == schedule  # a manifest
    assert Schedule.coerce(text) == schedule


def test_schema_1_schedules_and_manifests_are_still_read():
    old = {"method": "random", "reduction": 0.5, "encoder_share": 0.4, "encoder_layers": [1], "llm_layers": [2],
           "recycle_share": 0.1, "group_size": 5, "seed": 3, "schema_version": 1}  # fmt: skip
    schedule = Schedule.from_dict(old)
    assert schedule.method == "random" and schedule.params.seed == 3 and schedule.schema_version == 2
    assert Schedule.coerce({"schedule": {**old, "method": "illava", "group_size": 8}}).params.group_size == 8
    prune = Schedule.from_dict({**old, "method": "prune"})
    assert prune.params.to_dict() == {}  # schema 1 stored iLLaVA's fields on every schedule


def test_each_method_has_its_own_parameters():
    assert Schedule().params.to_dict() == {"recycle_share": 0.1, "group_size": 5}
    assert Schedule(method="random").params.to_dict() == {"seed": 0}
    assert Schedule(method="prune").params.to_dict() == {}
    changed = Schedule().with_(method="random", seed=4)  # method parameters by name
    assert changed.params.seed == 4 and changed.method == "random"
    assert Schedule().with_(group_size=8).params.group_size == 8
    assert Schedule(method="random").plan(100).encoder[0].recycled == 0
    with pytest.raises(ScheduleError, match=r"unknown parameter\(s\) \['seed'\] for method 'illava'"):
        Schedule(params={"seed": 1})
    with pytest.raises(ScheduleError, match=r"unknown schedule field\(s\) \['sede'\]"):
        Schedule().with_(sede=1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"reduction": 1.0}, r"reduction 1.0 is outside \[0, 1\)"),
        ({"reduction": -0.1}, "reduction -0.1"),
        ({"reduction": "0.5"}, r"reduction must be a number, got '0.5'"),
        ({"reduction": None}, r"reduction must be a number, got None"),
        ({"reduction": True}, r"reduction must be a number, got True"),
        ({"reduction": float("nan")}, r"reduction must be a number, got nan"),
        ({"encoder_share": 1.5}, "encoder_share 1.5"),
        ({"encoder_share": "half"}, r"encoder_share must be a number, got 'half'"),
        ({"method": "magic"}, "unknown method 'magic'; allowed: illava, prune, random"),
        ({"method": None}, "unknown method None"),
        ({"encoder_layers": (3, 1)}, "strictly increasing"),
        (
            {"encoder_layers": (5.7, 9, 13)},
            r"encoder_layers must be a list of integer layer indices, got \[5.7, 9, 13\]",
        ),
        ({"encoder_layers": "5,9,13"}, r"encoder_layers must be a list of integer layer indices, got '5,9,13'"),
        ({"encoder_layers": 5}, r"encoder_layers must be a list of integer layer indices, got 5"),
        ({"llm_layers": ["two", 8]}, r"llm_layers must be a list of integer layer indices"),
        ({"llm_layers": (-1,)}, "negative index"),
        ({"params": {"group_size": 0}}, r"group_size must be an integer >= 1, got 0"),
        ({"params": {"group_size": 2.5}}, r"group_size must be an integer >= 1, got 2.5"),
        ({"params": {"recycle_share": "0.1"}}, r"recycle_share must be a number in \[0, 1\), got '0.1'"),
        ({"method": "random", "params": {"seed": "0"}}, r"seed must be an integer >= 0, got '0'"),
        ({"params": [1, 2]}, r"params of method 'illava' must be a JSON object"),
        ({"schema_version": 9}, "schema_version 9"),
    ],
)
def test_invalid_schedules_say_what_is_wrong(fields, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule(**fields)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "a schedule in JSON could not be parsed"),
        ("[1, 2]", "a schedule must be a Schedule, a dict"),
        ({"schedule": "x"}, "the manifest's 'schedule' must be a JSON object"),
        ({"schedule_version": 2}, r"unknown schedule field\(s\) \['schedule_version'\]"),
        ({"schema_version": 7}, r"schema_version 7 is not supported \(this illava reads \[1, 2\]\)"),
        ({"schema_version": True}, "schema_version must be an integer, got True"),
        ({"reduction": 0.5, "params": None}, "params must be a JSON object of the method's parameters, got null"),
        (42, "a schedule must be a Schedule, a dict"),
        ("missing.json", "schedule file 'missing.json' does not exist"),
    ],
)
def test_malformed_input_of_every_kind_is_a_schedule_error(value, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ScheduleError, match=message):
        Schedule.coerce(value)


def test_a_malformed_schedule_file_is_a_schedule_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{oops")
    with pytest.raises(ScheduleError, match="is not valid JSON"):
        Schedule.coerce(path)


def test_unknown_fields_are_rejected():
    with pytest.raises(ScheduleError, match=r"unknown schedule field\(s\) \['ratio'\]"):
        Schedule.from_dict({"ratio": 0.5})


def test_check_fits_names_the_allowed_range():
    with pytest.raises(ScheduleError, match=r"encoder layer\(s\) \[40\] out of range: this encoder has 32 blocks"):
        Schedule(encoder_layers=(5, 40)).check_fits(encoder_depth=32, llm_depth=28)
    with pytest.raises(ScheduleError, match=r"allows 0..26"):
        Schedule(llm_layers=(27,)).check_fits(encoder_depth=32, llm_depth=28)
    Schedule.vanilla().check_fits(encoder_depth=1, llm_depth=1)  # removes nothing: always fits
