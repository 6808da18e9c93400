import gc
import sys
import threading
import time

import pytest
import torch

from profiler.memory import MemoryReading, MemorySampler, nvml_status

MIB = 1024 * 1024
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("MemorySampler")]


def test_cpu_sampler_sees_a_known_allocation_freed_inside_the_block():
    # 200 MiB, every page written (torch.ones), held 50 ms, freed before the block ends: only the
    # background thread can see it, the final read at exit cannot. Tolerance [0.9, 1.3] x 200 MiB:
    # RSS moves in whole pages and also counts what the interpreter and torch allocate around the
    # tensor (a few MiB), and unrelated memory the allocator returns meanwhile can lower it a little.
    gc.collect()
    size = 200 * MIB
    with MemorySampler("cpu") as sampler:
        tensor = torch.ones(size, dtype=torch.uint8)
        time.sleep(0.05)
        del tensor
    reading = sampler.reading
    assert reading.source == "rss" and reading.device == "cpu" and reading.note == ""
    assert reading.samples >= 3, "the background thread should have sampled during the 50 ms hold"
    assert 0.9 * size <= reading.peak_above_baseline_bytes <= 1.3 * size
    assert reading.peak_bytes == reading.baseline_bytes + reading.peak_above_baseline_bytes


def test_cpu_sampler_without_allocation_stays_well_below():
    gc.collect()
    with MemorySampler("cpu", interval_s=0.002) as sampler:
        time.sleep(0.03)
    reading = sampler.reading
    assert reading.samples >= 3
    assert 0 <= reading.peak_above_baseline_bytes < 20 * MIB  # vs the 200 MiB of the test above


def test_sampler_thread_is_gone_after_exit_also_when_the_body_raises():
    with MemorySampler() as sampler:
        assert len(_sampler_threads()) == 1
    assert _sampler_threads() == [] and sampler.reading.samples >= 1

    with pytest.raises(KeyError, match="boom"), MemorySampler() as failing:
        time.sleep(0.01)
        raise KeyError("boom")
    assert _sampler_threads() == []
    assert failing.reading.peak_bytes >= failing.reading.baseline_bytes > 0


def test_a_failing_read_ends_sampling_with_a_note_not_the_run(monkeypatch):
    from profiler import memory

    calls = {"n": 0}
    real_read = memory._RssProbe.read

    def flaky_read(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("statm vanished")
        return real_read(self)

    monkeypatch.setattr(memory._RssProbe, "read", flaky_read)
    with MemorySampler(interval_s=0.001) as sampler:
        time.sleep(0.03)
    assert _sampler_threads() == []
    assert "sampler stopped early" in sampler.reading.note and "statm vanished" in sampler.reading.note
    assert sampler.reading.samples == 1  # the baseline was read 1, the thread's first read 2, its second failed


def test_sampler_is_reusable_but_not_nested_and_reading_needs_a_run():
    sampler = MemorySampler()
    with pytest.raises(RuntimeError, match="no reading yet"):
        _ = sampler.reading
    with sampler, pytest.raises(RuntimeError, match="already running"), sampler:
        pass
    first = sampler.reading
    with sampler:
        pass
    assert sampler.reading is not first and _sampler_threads() == []


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        MemorySampler(interval_s=0)
    with pytest.raises(ValueError, match="allowed: 'cpu', 'cuda'"):
        MemorySampler("gpu")


def test_reading_to_dict_has_the_derived_peak():
    reading = MemoryReading("cpu", "rss", 100, 350, 4, 0.005, 0.1)
    data = reading.to_dict()
    assert data["peak_above_baseline_bytes"] == 250 and data["samples"] == 4
    assert MemoryReading("cuda:0", "none", None, None, 0, 0.005, 0.1).peak_above_baseline_bytes is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_nvml_status_says_no_nvidia_gpu_here():
    status = nvml_status()
    assert not status.available and status.device_count == 0
    assert "NVIDIA" in status.reason or "nvidia-ml-py" in status.reason


def test_nvml_status_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    status = nvml_status()
    assert not status.available and "nvidia-ml-py not installed" in status.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_sampler_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        MemorySampler("cuda")
    assert _sampler_threads() == []


@needs_cuda
def test_cuda_sampler_nvml_used_covers_the_torch_peak():
    size = 256 * MIB
    torch.cuda.empty_cache()  # so the allocation below has to come from the device, visible to NVML
    with MemorySampler("cuda") as sampler:
        tensor = torch.ones(size, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        time.sleep(0.05)
        del tensor
    reading = sampler.reading
    assert _sampler_threads() == []
    assert reading.torch_peak_bytes >= size and reading.torch_reserved_peak_bytes >= reading.torch_peak_bytes
    if not nvml_status().available:
        assert reading.source == "none" and reading.peak_bytes is None and "NVML" in reading.note
        return
    assert reading.source == "nvml" and reading.samples >= 3, reading.note
    assert reading.peak_bytes >= reading.torch_peak_bytes
    assert reading.peak_above_baseline_bytes >= 0.95 * size
    assert reading.nvml_device.startswith(("GPU-", "MIG-"))


def test_the_objective_is_the_allocator_peak_on_cuda_and_the_tensor_peak_on_cpu():
    from profiler import TensorPeak

    cuda = MemoryReading("cuda:0", "nvml", 100, 350, 4, 0.005, 0.1, torch_peak_bytes=300).to_dict()
    assert (cuda["objective_bytes"], cuda["objective_source"]) == (300, "cuda allocator peak (measured)")
    cpu = MemoryReading("cpu", "rss", 100, 350, 4, 0.005, 0.1)
    assert cpu.objective_bytes is None and cpu.objective_source is None  # the resident set is never the objective
    tracked = cpu.with_tensor_peak(TensorPeak(resident_bytes=1000, run_peak_bytes=24)).to_dict()
    assert tracked["objective_bytes"] == tracked["tensor_peak_bytes"] == 1024
    assert tracked["tensor_resident_bytes"] == 1000 and tracked["peak_above_baseline_bytes"] == 250
    assert tracked["objective_source"] == "cpu tensor peak (measured, torch profiler)"
    assert tracked["tensor_peak_source"].startswith("torch profiler")
