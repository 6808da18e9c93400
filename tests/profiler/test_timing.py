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


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_cuda_timing_waits_for_the_queued_kernels():
    import torch

    from profiler import time_once

    device = torch.device("cuda")
    torch.cuda._sleep(1000)  # initialise the context outside the timed call
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(50_000_000)
    stop.record()
    stop.synchronize()
    kernel_s = start.elapsed_time(stop) / 1e3
    assert kernel_s > 0.001
    # Launching returns at once; only a synchronised clock sees the kernel's duration.
    assert time_once(lambda: torch.cuda._sleep(50_000_000), device) >= 0.8 * kernel_s


def test_paired_ratios_divide_round_by_round():
    from profiler import Timing, paired_ratios

    ratios = paired_ratios(Timing((0.2, 0.3, 0.4)), Timing((0.1, 0.2, 0.1)))
    assert ratios.samples == pytest.approx((2.0, 1.5, 4.0)) and ratios.median == pytest.approx(2.0)
    with pytest.raises(ValueError, match="one run of each per round, got 2 reference runs and 1 others"):
        paired_ratios(Timing((0.2, 0.3)), Timing((0.1,)))
