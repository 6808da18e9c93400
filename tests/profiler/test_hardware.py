import ctypes
import json
from types import SimpleNamespace

import pytest
import torch

from profiler.hardware import (
    HardwareProfile,
    NvmlDevice,
    cpu_model,
    detect_hardware,
    driver_from_proc,
    match_nvml_device,
    mig_profile,
    resolve_device,
    split_mig_name,
)
from profiler.memory import nvml_status

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GIB = 1024**3


def _proc_meminfo_mib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("MemTotal:"))


def test_detect_cpu_fills_every_field_plausibly():
    profile = detect_hardware("cpu")
    assert profile.kind == "cpu" and profile.name and profile.name != "unknown CPU"
    assert "(R)" not in profile.name
    assert profile.memory_mib == _proc_meminfo_mib() and profile.memory_mib > 256
    assert profile.threads == torch.get_num_threads() >= 1
    assert profile.torch == torch.__version__ and profile.cuda == torch.version.cuda
    assert profile.driver is None and profile.mig_profile is None


def test_round_trip_and_stable_key():
    profile = detect_hardware(torch.device("cpu"))
    assert HardwareProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    assert profile.key() == detect_hardware().key() == f"cpu:{profile.name} x{profile.threads} float32/sdpa"
    gpu = HardwareProfile("cuda", "NVIDIA H100 80GB HBM3", 9984, 16, "2.13.0", "12.8", "570.86.15", "1g.10gb")
    assert gpu.key() == "cuda:NVIDIA H100 80GB HBM3 MIG 1g.10gb float32/sdpa"
    assert HardwareProfile.from_dict(gpu.to_dict()) == gpu
    assert gpu.key() != HardwareProfile(**{**gpu.to_dict(), "mig_profile": None}).key()


def test_the_deployment_configuration_is_part_of_the_identity():
    profile = detect_hardware("cpu", dtype=torch.bfloat16, attention="illava_packed")
    assert (profile.dtype, profile.attention) == ("bfloat16", "illava_packed")
    assert profile.key().endswith(" bfloat16/illava_packed") and profile.key() != detect_hardware("cpu").key()
    assert HardwareProfile.from_dict(profile.to_dict()) == profile
    stored_before = {k: v for k, v in profile.to_dict().items() if k not in ("dtype", "attention")}
    old = HardwareProfile.from_dict(stored_before)  # profiles stored before the fields existed
    assert (old.dtype, old.attention) == ("float32", "sdpa")
    with pytest.raises(ValueError, match="unsupported dtype 'int8'; allowed: float32, bfloat16, float16"):
        detect_hardware("cpu", dtype="int8")


def test_bad_profiles_are_refused_by_name():
    data = detect_hardware().to_dict()
    with pytest.raises(ValueError, match=r"missing \['threads'\]"):
        HardwareProfile.from_dict({k: v for k, v in data.items() if k != "threads"})
    with pytest.raises(ValueError, match=r"unknown \['gpu'\]"):
        HardwareProfile.from_dict({**data, "gpu": "x"})
    with pytest.raises(ValueError, match="kind must be one of"):
        HardwareProfile(**{**data, "kind": "tpu"})
    with pytest.raises(ValueError, match="memory_mib must be an integer"):
        HardwareProfile(**{**data, "memory_mib": -1})


def test_resolve_device_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unsupported device 'meta'"):
        resolve_device("meta")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            detect_hardware("cuda:0")


def test_cpu_model_reads_x86_and_arm_cpuinfo():
    x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
    assert cpu_model(x86) == "Intel Xeon Platinum 8480+"
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd4f\n"
    assert "implementer 0x41 part 0xd4f" in cpu_model(arm)
    assert cpu_model("Processor\t: ARMv7 Processor rev 10 (v7l)\nprocessor\t: 0\n") == "ARMv7 Processor rev 10 (v7l)"
    assert cpu_model("")  # platform fallback, never empty


def test_mig_names_and_driver_text():
    assert split_mig_name("NVIDIA A100-SXM4-40GB MIG 1g.5gb") == ("NVIDIA A100-SXM4-40GB", "1g.5gb")
    assert split_mig_name("NVIDIA H100 80GB HBM3 MIG 1c.3g.40gb") == ("NVIDIA H100 80GB HBM3", "1c.3g.40gb")
    assert split_mig_name("NVIDIA H100 80GB HBM3") == ("NVIDIA H100 80GB HBM3", None)
    closed = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
    opened = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16)\n"
    assert driver_from_proc(closed) == "535.104.05" and driver_from_proc(opened) == "570.86.15"
    assert driver_from_proc("") is None


class FakeNvml:
    """Just enough of pynvml's surface to exercise the CUDA -> NVML matching logic without a GPU
    (the real path is covered by the CUDA-only tests). Handles are strings; devices have no
    nvmlDeviceGetGpuInstanceId, like an nvidia-ml-py too old for it."""

    NVML_DEVICE_MIG_ENABLE = 1

    class NVMLError(Exception):
        pass

    def __init__(self, mig_children: dict[str, int] | None = None, mig_names: bool = True):
        self.uuids = {"gpu0": "GPU-aaaa", "gpu1": "GPU-bbbb"}
        self.memory = {"gpu0": 80 * GIB, "gpu1": 80 * GIB}
        self.children = list(mig_children or {})
        for child, total in (mig_children or {}).items():
            self.uuids[child] = f"MIG-{child}"
            self.memory[child] = total
        self.mig_names = mig_names

    def _check(self, handle):
        if handle not in self.uuids:
            raise self.NVMLError("Not Found")

    def nvmlDeviceGetHandleByUUID(self, uuid):
        for handle, known in self.uuids.items():
            if known == uuid:
                return handle
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetHandleByIndex(self, index):
        return ["gpu0", "gpu1"][index]

    def nvmlDeviceIsMigDeviceHandle(self, handle):
        return ctypes.c_uint(handle in self.children)  # pynvml hands back a c_uint here

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle):
        return "gpu0"

    def nvmlDeviceGetMigMode(self, handle):
        return [int(handle == "gpu0" and bool(self.children)), 0]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, index):
        if index >= len(self.children):
            raise self.NVMLError("Not Found")
        return self.children[index]

    def nvmlDeviceGetUUID(self, handle):
        self._check(handle)
        return self.uuids[handle]

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=self.memory[handle], used=GIB)

    def nvmlDeviceGetName(self, handle):
        base = "NVIDIA H100 80GB HBM3"
        return f"{base} MIG 2g.20gb" if self.mig_names and handle in self.children else base

    def nvmlDeviceGetAttributes(self, handle):
        return SimpleNamespace(gpuInstanceSliceCount=1, memorySizeMB=9856)


def test_nvml_match_plain_gpu_by_cuda_uuid_then_by_index():
    nvml = FakeNvml()
    device = match_nvml_device(nvml, cuda_uuid="bbbb", visible_entry="0", total_memory=80 * GIB)
    assert device == NvmlDevice("gpu1", "GPU-bbbb", False, None, "CUDA UUID GPU-bbbb")
    by_index = match_nvml_device(nvml, cuda_uuid=None, visible_entry="1", total_memory=None)
    assert by_index.handle == "gpu1" and "order" in by_index.found_by
    with pytest.raises(LookupError, match="no NVML device matches"):
        match_nvml_device(nvml, cuda_uuid="zzzz", visible_entry="", total_memory=None)


def test_nvml_match_mig_instance_directly_and_via_its_parent():
    nvml = FakeNvml({"m1": 20 * GIB, "m2": 40 * GIB})
    direct = match_nvml_device(nvml, cuda_uuid="m2", visible_entry="0", total_memory=40 * GIB)
    assert direct.handle == "m2" and direct.is_mig and direct.parent == "gpu0"
    by_env = match_nvml_device(nvml, cuda_uuid="aaaa", visible_entry="MIG-m1", total_memory=None)
    assert by_env.handle == "m1" and by_env.parent == "gpu0" and "by UUID" in by_env.found_by
    by_memory = match_nvml_device(nvml, cuda_uuid="aaaa", visible_entry="0", total_memory=40 * GIB)
    assert by_memory.handle == "m2" and "memory" in by_memory.found_by
    assert mig_profile(nvml, by_memory) == "2g.20gb"


def test_nvml_match_refuses_an_ambiguous_mig_instance():
    nvml = FakeNvml({"m1": 10 * GIB, "m2": 10 * GIB})
    with pytest.raises(LookupError, match="MIG enabled with 2 instance"):
        match_nvml_device(nvml, cuda_uuid="aaaa", visible_entry="0", total_memory=10 * GIB)
    only = FakeNvml({"m1": 10 * GIB}, mig_names=False)
    device = match_nvml_device(only, cuda_uuid="aaaa", visible_entry="0", total_memory=None)
    assert device.handle == "m1" and "only MIG instance" in device.found_by
    assert mig_profile(only, device) == "1g.10gb"  # from slice count and memory: the last fallback


@needs_cuda
def test_detect_cuda_profile_is_filled_and_mig_aware():
    profile = detect_hardware("cuda")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    assert profile.kind == "cuda" and profile.name and " MIG " not in profile.name
    assert profile.memory_mib == props.total_memory // 1024**2 > 0
    assert profile.threads == props.multi_processor_count > 0
    assert profile.cuda == torch.version.cuda
    if nvml_status().available:
        assert profile.driver
    if " MIG " in props.name:
        assert profile.mig_profile and profile.key().endswith(f"MIG {profile.mig_profile}")
    assert HardwareProfile.from_dict(profile.to_dict()) == profile
