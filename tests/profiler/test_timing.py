import time

import pytest

from profiler import time_call


def test_time_call_measures_each_run_after_warmup():
    calls = []

    def work():
        calls.append(1)
        time.sleep(0.01)

    timing = time_call(work, repeats=4, warmup=2)
    assert len(calls) == 6 and len(timing.samples) == 4
    assert all(0.009 < s < 0.5 for s in timing.samples)
    assert timing.low <= timing.median <= timing.high and timing.spread >= 0


def test_time_call_rejects_zero_repeats():
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_call(lambda: None, repeats=0)
