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
    schedule = Schedule(method="prune", reduction=0.5, encoder_layers=[1, 3], llm_layers=[2], group_size=3)
    text = schedule.to_json()
    assert json.loads(text)["schema_version"] == 1
    assert Schedule.from_json(text) == schedule
    assert Schedule.coerce({"schedule": schedule.to_dict(), "backbone": "x"}) == schedule  # a manifest


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"reduction": 1.0}, r"reduction 1.0 is outside \[0, 1\)"),
        ({"reduction": -0.1}, "reduction -0.1"),
        ({"encoder_share": 1.5}, "encoder_share 1.5"),
        ({"method": "magic"}, "unknown method 'magic'; allowed: illava, prune, random"),
        ({"encoder_layers": (3, 1)}, "strictly increasing"),
        ({"llm_layers": (-1,)}, "negative index"),
        ({"group_size": 0}, "group_size 0"),
        ({"schema_version": 9}, "schema_version 9"),
    ],
)
def test_invalid_schedules_say_what_is_wrong(fields, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule(**fields)


def test_unknown_fields_are_rejected():
    with pytest.raises(ScheduleError, match=r"unknown schedule field\(s\) \['ratio'\]"):
        Schedule.from_dict({"ratio": 0.5})


def test_check_fits_names_the_allowed_range():
    with pytest.raises(ScheduleError, match=r"encoder layer\(s\) \[40\] out of range: this encoder has 32 blocks"):
        Schedule(encoder_layers=(5, 40)).check_fits(encoder_depth=32, llm_depth=28)
    with pytest.raises(ScheduleError, match=r"allows 0..26"):
        Schedule(llm_layers=(27,)).check_fits(encoder_depth=32, llm_depth=28)
    Schedule.vanilla().check_fits(encoder_depth=1, llm_depth=1)  # removes nothing: always fits
