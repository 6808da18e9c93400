"""The profiler on a CUDA device (`tiny` backbone): CUDA-event stage times, NVML and torch
peaks, a CUDA hardware profile. Skipped where torch sees no CUDA device."""

import dataclasses

import pytest
import torch

from illava import Schedule
from profiler import Profiler, resolve_workload
from profiler.memory import nvml_status

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def profiler(request):
    return Profiler("tiny", device="cuda", dtype=request.param, repeats=3, warmup=1)


def test_a_cuda_measurement_fills_every_field(profiler):
    workload = dataclasses.replace(resolve_workload("single-448"), samples=2, output_tokens=4)
    result = profiler.measure(Schedule.paper_default(7 / 9, encoder_depth=6, llm_depth=6), workload)
    reference = profiler.reference(workload)
    for spread in (result.prefill_s, result.encoder_s, result.merger_s, result.llm_s):
        assert spread.runs == 3 and 0 < spread.low <= spread.median <= spread.high
    assert result.encoder_s.median + result.merger_s.median < result.prefill_s.median
    assert result.decode_tokens_per_s > 0 and result.samples_per_s > 0
    assert result.image_tokens_to_llm < reference.image_tokens_to_llm
    assert result.hardware["kind"] == "cuda" and result.hardware["threads"] > 0
    memory = result.peak_memory
    assert memory["device"].startswith("cuda:") and memory["torch_peak_bytes"] > 0
    assert memory["torch_reserved_peak_bytes"] >= memory["torch_peak_bytes"]
    if nvml_status().available:
        assert memory["source"] == "nvml" and memory["samples"] >= 1, memory["note"]
        assert memory["peak_bytes"] >= memory["torch_peak_bytes"]
        # The sampler empties torch's cache first: this run's own allocations show above the baseline.
        assert memory["peak_above_baseline_bytes"] > 0
        assert result.hardware["driver"]
    else:
        assert memory["source"] == "none" and "NVML" in memory["note"]
    assert 0.0 <= result.fidelity.first_token_agreement <= 1.0 and result.fidelity.mean_kl >= 0


def test_the_schedule_that_removes_nothing_matches_the_reference_on_cuda(profiler):
    workload = dataclasses.replace(resolve_workload("single-448"), samples=2, output_tokens=3)
    result = profiler.measure(Schedule.vanilla(), workload)
    assert result.fidelity.first_token_agreement == 1.0
    assert result.fidelity.greedy_match_rate == 1.0
    assert result.fidelity.mean_kl < 1e-3
