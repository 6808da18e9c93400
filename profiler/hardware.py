"""Which machine a measurement was taken on. A schedule's latency and memory only mean something
together with the hardware, so every measurement carries a `HardwareProfile`, and `key()` groups
measurements that are comparable.

NVML (`pynvml`, from nvidia-ml-py) is imported lazily and every NVML call is guarded: a missing
package, a missing driver or a call a driver does not support leaves the field it would fill at its
fallback (documented per field) instead of failing the measurement.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from illava.runtime import DEFAULT_ATTENTION, DEFAULT_DTYPE, dtype_name

MIB = 1024 * 1024
_KINDS = ("cuda", "cpu")
# CUDA and NVML name a MIG instance "<GPU name> MIG <profile>", e.g. "NVIDIA H100 80GB HBM3 MIG 1g.10gb".
_MIG_NAME = re.compile(r"^(?P<base>.*?)\s+MIG\s+(?P<profile>\S+)\s*$")
_DRIVER_IN_PROC = re.compile(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)")
_TRADEMARKS = re.compile(r"\((?:R|TM|tm)\)")


@dataclass(frozen=True)
class HardwareProfile:
    """What a measurement ran on.

    `threads` is `torch.get_num_threads()` on CPU (what torch will actually use, which moves CPU
    latency directly) and the streaming-multiprocessor count on CUDA (on a MIG instance: the
    instance's SMs, which is what distinguishes a 1g from a 7g slice of the same GPU).
    `memory_mib` is system RAM on CPU and the device memory CUDA reports on GPU (on MIG: the
    instance's). `name` of a MIG instance is the physical GPU's name; the slice is `mig_profile`.
    `driver` is None when neither NVML nor /proc/driver/nvidia/version can tell it; `mig_profile`
    is None when the device is not a MIG instance or no source could name the profile.
    `dtype` and `attention` are the configuration the model ran in (`illava.runtime`): part of the
    identity, because a latency measured in float32 with sdpa says nothing about bfloat16 with
    flash attention on the same card.
    """

    kind: str
    name: str
    memory_mib: int
    threads: int
    torch: str
    cuda: str | None
    driver: str | None
    mig_profile: str | None
    dtype: str = DEFAULT_DTYPE
    attention: str = DEFAULT_ATTENTION

    def __post_init__(self) -> None:
        dtype_name(self.dtype)  # a ValueError naming the allowed ones
        if not isinstance(self.attention, str) or not self.attention.strip():
            raise ValueError(f"HardwareProfile.attention must be a non-empty string, got {self.attention!r}")
        if self.kind not in _KINDS:
            raise ValueError(f"HardwareProfile.kind must be one of {_KINDS}, got {self.kind!r}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"HardwareProfile.name must be a non-empty string, got {self.name!r}")
        for field in ("memory_mib", "threads"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"HardwareProfile.{field} must be an integer >= 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HardwareProfile:
        """Strict inverse of `to_dict`: a missing or unknown key is an error, so a stored profile
        from another schema version is never silently half-read. The one exception is `dtype` and
        `attention`, which profiles stored before they were recorded lack: those were all measured
        in float32 with sdpa, and read so."""
        allowed = [f.name for f in fields(cls)]
        data = {"dtype": DEFAULT_DTYPE, "attention": DEFAULT_ATTENTION, **data}
        missing = [k for k in allowed if k not in data]
        unknown = sorted(set(data) - set(allowed))
        if missing or unknown:
            raise ValueError(
                f"HardwareProfile.from_dict: missing {missing}, unknown {unknown}; allowed keys: {allowed}"
            )
        return cls(**{k: data[k] for k in allowed})

    def key(self) -> str:
        """Short stable label grouping comparable measurements: the device model (and MIG slice,
        or CPU thread count), then dtype/attention, e.g. "cuda:NVIDIA H200 bfloat16/sdpa".
        Versions are left out on purpose; they stay in the profile."""
        if self.kind == "cuda":
            device = f"cuda:{self.name}" + (f" MIG {self.mig_profile}" if self.mig_profile else "")
        else:
            device = f"cpu:{self.name} x{self.threads}"
        return f"{device} {self.dtype}/{self.attention}"


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device with an explicit index for CUDA, or a clear error: the profiler
    supports "cpu" and "cuda[:N]" only, and CUDA only where torch can see it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; allowed: 'cpu', 'cuda', 'cuda:N'") from err
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"unsupported device {device!r}; allowed: 'cpu', 'cuda', 'cuda:N'")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device {str(device)!r} asked for, but torch sees no CUDA device (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}); use device='cpu' on this machine"
        )
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def detect_hardware(
    device: str | torch.device = "cpu", *, dtype: torch.dtype | str = DEFAULT_DTYPE, attention: str = DEFAULT_ATTENTION
) -> HardwareProfile:
    """Profile of the machine `device` lives on, running a model in `dtype` with `attention` (see
    `HardwareProfile` for each field's source)."""
    dev = resolve_device(device)
    profile = _detect_cuda(dev.index) if dev.type == "cuda" else _detect_cpu()
    return replace(profile, dtype=dtype_name(dtype), attention=attention)


# ---------------------------------------------------------------- CPU


def _detect_cpu() -> HardwareProfile:
    return HardwareProfile(
        kind="cpu",
        name=cpu_model(),
        memory_mib=_system_memory_bytes() // MIB,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        driver=None,
        mig_profile=None,
    )


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    """CPU model from /proc/cpuinfo: x86's "model name", else the ARM/MIPS spellings, else the
    ARM implementer/part codes, else what `platform` knows. Trademark marks are dropped."""
    text = _read_text("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            info.setdefault(key.strip(), value.strip())
    for key in ("model name", "Hardware", "cpu model", "Processor"):
        if key in info:
            return _clean_name(info[key])
    if "CPU implementer" in info:
        return f"{platform.machine() or 'ARM'} implementer {info['CPU implementer']} part {info.get('CPU part', '?')}"
    return _clean_name(platform.processor() or platform.machine() or "unknown CPU")


def _clean_name(name: str) -> str:
    return " ".join(_TRADEMARKS.sub("", name).split()) or "unknown CPU"


def _system_memory_bytes() -> int:
    """Physical RAM: MemTotal from /proc/meminfo, else pages x page size from sysconf."""
    for line in _read_text("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


# ---------------------------------------------------------------- CUDA


def _detect_cuda(index: int) -> HardwareProfile:
    props = torch.cuda.get_device_properties(index)
    base, mig_from_name = split_mig_name(props.name)
    driver, mig_from_nvml = _nvml_identity(index)
    return HardwareProfile(
        kind="cuda",
        name=base,
        memory_mib=props.total_memory // MIB,
        threads=props.multi_processor_count,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        driver=driver or driver_from_proc(),
        mig_profile=mig_from_name or mig_from_nvml,
    )


def split_mig_name(name: str) -> tuple[str, str | None]:
    """("NVIDIA H100 80GB HBM3", "1g.10gb") from "NVIDIA H100 80GB HBM3 MIG 1g.10gb"; a plain
    GPU name comes back unchanged with None."""
    match = _MIG_NAME.match(name.strip())
    return (match["base"], match["profile"]) if match else (name.strip(), None)


def driver_from_proc(text: str | None = None) -> str | None:
    """Driver version from /proc/driver/nvidia/version: the fallback when NVML cannot say."""
    match = _DRIVER_IN_PROC.search(_read_text("/proc/driver/nvidia/version") if text is None else text)
    return match[1] if match else None


def _nvml_identity(index: int) -> tuple[str | None, str | None]:
    """(driver version, MIG profile) from NVML; (None, None) when NVML is absent or fails."""
    try:
        with nvml_session() as nvml:
            driver = _try(nvml, "nvmlSystemGetDriverVersion")
            try:
                device = nvml_device_for_cuda(nvml, index)
            except LookupError:
                return driver, None
            return driver, mig_profile(nvml, device) if device.is_mig else None
    except Exception:  # ImportError, NVMLError from init: no NVML on this machine
        return None, None


# ---------------------------------------------------------------- NVML plumbing (shared with memory.py)


@contextmanager
def nvml_session() -> Iterator[Any]:
    """Yield the `pynvml` module between nvmlInit and nvmlShutdown. NVML reference-counts init, so
    sessions may nest. Raises ImportError without nvidia-ml-py and pynvml.NVMLError when NVML
    cannot start (no driver, no library)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        yield pynvml
    finally:
        with suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _try(nvml: Any, call: str, *args: Any) -> Any:
    """`nvml.<call>(*args)`, or None when NVML reports an error (unsupported by this GPU or driver,
    no permission) or this nvidia-ml-py predates the call."""
    try:
        return getattr(nvml, call)(*args)
    except (nvml.NVMLError, AttributeError):
        return None


@dataclass(frozen=True)
class NvmlDevice:
    """The NVML handle whose numbers belong to one CUDA device: the MIG instance itself when the
    device is a MIG slice (never the whole GPU). `found_by` says how the match was made."""

    handle: Any
    uuid: str
    is_mig: bool
    parent: Any
    found_by: str


def nvml_device_for_cuda(nvml: Any, index: int) -> NvmlDevice:
    """The NVML device behind torch's CUDA device `index` (inside an open `nvml_session`).

    CUDA and NVML number devices differently (CUDA_VISIBLE_DEVICES, CUDA_DEVICE_ORDER), so the
    match goes by UUID first; raises LookupError when no match is trustworthy."""
    props = torch.cuda.get_device_properties(index)
    uuid = str(getattr(props, "uuid", "") or "") or None
    return match_nvml_device(nvml, cuda_uuid=uuid, visible_entry=_visible_entry(index), total_memory=props.total_memory)


def _visible_entry(index: int) -> str:
    """What CUDA_VISIBLE_DEVICES says CUDA device `index` is (a physical index or a UUID); the
    index itself when the variable is unset."""
    var = os.environ.get("CUDA_VISIBLE_DEVICES")
    if var is None:
        return str(index)
    entries = [e.strip() for e in var.split(",") if e.strip()]
    return entries[index] if index < len(entries) else ""


def match_nvml_device(nvml: Any, *, cuda_uuid: str | None, visible_entry: str, total_memory: int | None) -> NvmlDevice:
    """Torch-free core of `nvml_device_for_cuda`, so its logic is testable without a GPU.

    Order: the UUID CUDA reports (tried as "GPU-" and "MIG-"), then CUDA_VISIBLE_DEVICES (a UUID,
    or a physical index that assumes CUDA and NVML order agree). When that lands on a whole GPU
    with MIG enabled, the instance is picked among its MIG devices."""
    handle, found_by = _find_handle(nvml, cuda_uuid, visible_entry)
    if _is_mig_handle(nvml, handle):
        parent = _try(nvml, "nvmlDeviceGetDeviceHandleFromMigDeviceHandle", handle)
        return NvmlDevice(handle, _uuid(nvml, handle), True, parent, found_by)
    if not _mig_enabled(nvml, handle):
        return NvmlDevice(handle, _uuid(nvml, handle), False, None, found_by)
    child, how = _find_mig_child(nvml, handle, cuda_uuid, visible_entry, total_memory)
    return NvmlDevice(child, _uuid(nvml, child), True, handle, f"{found_by}, then {how}")


def _uuid_candidates(uuid: str | None) -> list[str]:
    if not uuid:
        return []
    if uuid.startswith(("GPU-", "MIG-")):
        return [uuid]
    return [f"GPU-{uuid}", f"MIG-{uuid}"]


def _find_handle(nvml: Any, cuda_uuid: str | None, visible_entry: str) -> tuple[Any, str]:
    for candidate in _uuid_candidates(cuda_uuid):
        handle = _try(nvml, "nvmlDeviceGetHandleByUUID", candidate)
        if handle is not None:
            return handle, f"CUDA UUID {candidate}"
    if visible_entry.startswith(("GPU-", "MIG-")):
        handle = _try(nvml, "nvmlDeviceGetHandleByUUID", visible_entry)
        if handle is not None:
            return handle, f"CUDA_VISIBLE_DEVICES UUID {visible_entry}"
    if visible_entry.isdigit():
        handle = _try(nvml, "nvmlDeviceGetHandleByIndex", int(visible_entry))
        if handle is not None:
            return handle, f"NVML index {visible_entry} (assumes CUDA and NVML order agree)"
    raise LookupError(f"no NVML device matches CUDA UUID {cuda_uuid!r} or CUDA_VISIBLE_DEVICES entry {visible_entry!r}")


def _is_mig_handle(nvml: Any, handle: Any) -> bool:
    flag = _try(nvml, "nvmlDeviceIsMigDeviceHandle", handle)
    return bool(getattr(flag, "value", flag))  # pynvml returns a ctypes c_uint here, not an int


def _mig_enabled(nvml: Any, handle: Any) -> bool:
    modes = _try(nvml, "nvmlDeviceGetMigMode", handle)  # NotSupported on GPUs without MIG
    return bool(modes) and modes[0] == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1)


def _uuid(nvml: Any, handle: Any) -> str:
    return _try(nvml, "nvmlDeviceGetUUID", handle) or "?"


def _mig_children(nvml: Any, parent: Any) -> list[Any]:
    slots = _try(nvml, "nvmlDeviceGetMaxMigDeviceCount", parent) or 0
    children = (_try(nvml, "nvmlDeviceGetMigDeviceHandleByIndex", parent, i) for i in range(slots))
    return [c for c in children if c is not None]  # empty slots answer NotFound


def _find_mig_child(
    nvml: Any, parent: Any, cuda_uuid: str | None, visible_entry: str, total_memory: int | None
) -> tuple[Any, str]:
    """The MIG instance of `parent` that is our CUDA device: by UUID, else the only instance, else
    the only one whose memory matches CUDA's (within 5%). Ambiguity is a LookupError, because the
    wrong instance's numbers would look plausible and be wrong."""
    children = _mig_children(nvml, parent)
    wanted = {u for u in _uuid_candidates(cuda_uuid) if u.startswith("MIG-")} | {visible_entry}
    for child in children:
        if _uuid(nvml, child) in wanted:
            return child, "MIG instance by UUID"
    if len(children) == 1:
        return children[0], "the GPU's only MIG instance"
    if total_memory:
        totals = [getattr(_try(nvml, "nvmlDeviceGetMemoryInfo", c), "total", 0) for c in children]
        close = [c for c, t in zip(children, totals) if abs(t - total_memory) <= 0.05 * total_memory]
        if len(close) == 1:
            return close[0], "the only MIG instance whose memory matches CUDA's"
    raise LookupError(
        f"the GPU has MIG enabled with {len(children)} instance(s) and none is identifiable as this CUDA device; "
        "set CUDA_VISIBLE_DEVICES=MIG-<uuid> (see nvidia-smi -L)"
    )


def mig_profile(nvml: Any, device: NvmlDevice) -> str | None:
    """The MIG profile ("1g.10gb") of a MIG device: from NVML's device name, else the GPU-instance
    profile (a privileged query on most drivers), else built from the instance's slice count and
    memory (rounded up to whole GiB, NVIDIA's naming habit; approximate)."""
    _, profile = split_mig_name(_try(nvml, "nvmlDeviceGetName", device.handle) or "")
    return profile or _mig_profile_privileged(nvml, device) or _mig_profile_from_attributes(nvml, device)


def _mig_profile_privileged(nvml: Any, device: NvmlDevice) -> str | None:
    if device.parent is None:
        return None
    gi_id = _try(nvml, "nvmlDeviceGetGpuInstanceId", device.handle)
    instance = None if gi_id is None else _try(nvml, "nvmlDeviceGetGpuInstanceById", device.parent, gi_id)
    info = None if instance is None else _try(nvml, "nvmlGpuInstanceGetInfo", instance)
    if info is None:
        return None
    profile = _try(nvml, "nvmlDeviceGetGpuInstanceProfileInfoById", device.parent, info.profileId)
    name = getattr(profile, "name", b"")
    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return name.removeprefix("MIG").strip() or None


def _mig_profile_from_attributes(nvml: Any, device: NvmlDevice) -> str | None:
    attrs = _try(nvml, "nvmlDeviceGetAttributes", device.handle)
    if attrs is None or not attrs.gpuInstanceSliceCount or not attrs.memorySizeMB:
        return None
    return f"{attrs.gpuInstanceSliceCount}g.{-(-attrs.memorySizeMB // 1024)}gb"
