"""Peak memory of a run in flight. A peak is a moment, so one reading before and one after a run
misses it: `MemorySampler` reads memory in a background thread every few milliseconds while the
body of its `with` block runs, and keeps the maximum.

On CPU it reads this process's resident set size. On CUDA it reads the device memory NVML says
is used (on a MIG slice: that instance's), which is what an operator sees in nvidia-smi and what
decides whether a second model fits, and also torch's allocator peaks, which count tensors only.
Without NVML the CUDA sampler still gives the torch peaks and says why the NVML fields are None.

The resident set of a CPU process moves with what the allocator and the interpreter keep or hand
back, so its peak differs between runs of the same work (0.0 vs 0.8 MiB above the baseline). What a
CPU deployment pays for tensors is read instead by `tensor_peak`: one untimed run under torch's
profiler with memory profiling on, whose allocation and free events, in order, give the peak of
live tensor bytes exactly. The same work gives the same bytes, also in another process; it depends
on the torch build and thread count (some kernels size their workspace per thread). Which figure a
search minimises is `MemoryReading.objective_bytes`.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from types import TracebackType
from typing import Any

import torch

from .hardware import nvml_device_for_cuda, nvml_session, resolve_device

_JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class NvmlStatus:
    """Whether NVML metrics exist here and, when not, why (shown to the user as is)."""

    available: bool
    reason: str
    device_count: int


def nvml_status() -> NvmlStatus:
    """Probe NVML once: never raises, so callers can log the reason and fall back."""
    try:
        with nvml_session() as nvml:
            count = int(nvml.nvmlDeviceGetCount())
            driver = nvml.nvmlSystemGetDriverVersion()
    except ImportError:
        return NvmlStatus(False, "nvidia-ml-py not installed (pip install nvidia-ml-py): no NVML metrics", 0)
    except Exception as err:  # pynvml.NVMLError, or anything odd from a broken driver install
        return NvmlStatus(False, nvml_failure_reason(err), 0)
    if count == 0:
        return NvmlStatus(False, "no NVIDIA GPU: NVML runs but reports 0 devices", 0)
    return NvmlStatus(True, f"NVML ready: {count} device(s), driver {driver}", count)


def nvml_failure_reason(err: BaseException) -> str:
    """A sentence for why NVML failed, naming the missing piece rather than an error code."""
    kind = type(err).__name__
    if kind == "NVMLError_LibraryNotFound":
        return "no NVIDIA GPU: the NVML library (libnvidia-ml.so.1, shipped with the NVIDIA driver) is not installed"
    if kind == "NVMLError_DriverNotLoaded":
        return "no NVIDIA GPU: the NVIDIA kernel driver is not loaded"
    if kind == "NVMLError_NoPermission":
        return f"NVML refused access (insufficient permissions): {err}"
    return f"NVML failed ({kind}): {err}"


@dataclass(frozen=True)
class MemoryReading:
    """What one sampled run used, in bytes.

    `source` says what baseline/peak measure: "rss" (this process's resident memory), "nvml"
    (device memory used; on CUDA this includes the CUDA context, the caching allocator's reserve
    and any other process on the same GPU or MIG instance) or "none" (no source; see `note`).
    `samples` counts the background thread's reads (the reads at enter and exit are extra), so 0
    means the thread never sampled. `torch_*` are CUDA only: the allocator's peaks during the run.
    `tensor_*` are CPU only, from `tensor_peak` (None where it did not run or failed; see `note`):
    the peak of live tensor bytes of one untimed run, the resident tensors (weights, buffers,
    inputs) included, and those resident bytes alone.

    `objective_bytes` is the one figure a search minimises, with `objective_source` saying which
    it is: on CUDA the allocator peak (`torch_peak_bytes`), on CPU the tensor peak; None (both)
    when that figure is missing.
    """

    device: str
    source: str
    baseline_bytes: int | None
    peak_bytes: int | None
    samples: int
    interval_s: float
    duration_s: float
    torch_peak_bytes: int | None = None
    torch_reserved_peak_bytes: int | None = None
    nvml_device: str | None = None
    note: str = ""
    tensor_peak_bytes: int | None = None
    tensor_resident_bytes: int | None = None
    tensor_peak_source: str | None = None

    @property
    def peak_above_baseline_bytes(self) -> int | None:
        if self.peak_bytes is None or self.baseline_bytes is None:
            return None
        return self.peak_bytes - self.baseline_bytes

    @property
    def objective_bytes(self) -> int | None:
        return self._objective()[0]

    @property
    def objective_source(self) -> str | None:
        return self._objective()[1]

    def _objective(self) -> tuple[int | None, str | None]:
        if self.device.startswith("cuda"):
            return (self.torch_peak_bytes, CUDA_OBJECTIVE) if self.torch_peak_bytes is not None else (None, None)
        return (self.tensor_peak_bytes, CPU_OBJECTIVE) if self.tensor_peak_bytes is not None else (None, None)

    def with_tensor_peak(self, peak: TensorPeak) -> MemoryReading:
        """This reading with the CPU tensor peak of a run `tensor_peak` tracked."""
        return replace(
            self, tensor_peak_bytes=peak.peak_bytes, tensor_resident_bytes=peak.resident_bytes,
            tensor_peak_source=TENSOR_PEAK_SOURCE,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "peak_above_baseline_bytes": self.peak_above_baseline_bytes,
            "objective_bytes": self.objective_bytes,
            "objective_source": self.objective_source,
        }


class _RssProbe:
    """Resident set size of this process: /proc/self/statm (field 2, in pages) through one open
    descriptor, so a read costs a few microseconds; psutil where there is no /proc."""

    source = "rss"

    def __init__(self) -> None:
        self._fd: int | None = None
        self._psutil_process: Any = None
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY)
            self._page = os.sysconf("SC_PAGE_SIZE")
        except OSError:
            try:
                import psutil
            except ImportError:
                raise RuntimeError("reading process memory needs /proc/self/statm (Linux) or psutil") from None
            self._psutil_process = psutil.Process()

    def read(self) -> int:
        if self._fd is not None:
            return int(os.pread(self._fd, 128, 0).split()[1]) * self._page
        return int(self._psutil_process.memory_info().rss)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _NvmlProbe:
    """Device memory used, from NVML, for the NVML device matched to a CUDA index (the MIG
    instance on a MIG slice). Holds an NVML session open from enter to exit."""

    source = "nvml"

    def __init__(self, index: int) -> None:
        self._stack = ExitStack()
        try:
            self._nvml = self._stack.enter_context(nvml_session())
            device = nvml_device_for_cuda(self._nvml, index)
        except BaseException:
            self._stack.close()
            raise
        self._handle = device.handle
        self.label = f"{device.uuid} (matched by {device.found_by})"

    def read(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def close(self) -> None:
        self._stack.close()


def _open_nvml_probe(index: int) -> tuple[_NvmlProbe | None, str]:
    """An NVML probe, or None with the reason the NVML fields will be None."""
    try:
        return _NvmlProbe(index), ""
    except ImportError:
        return None, "NVML fields are None: nvidia-ml-py not installed (pip install nvidia-ml-py)"
    except LookupError as err:
        return None, f"NVML fields are None: {err}"
    except Exception as err:
        return None, f"NVML fields are None: {nvml_failure_reason(err)}"


class MemorySampler:
    """`with MemorySampler("cuda:0") as s: run()` then `s.reading`: peak memory while `run()` ran.

    One background thread reads memory every `interval_s`; there is also a read at enter (the
    baseline) and one at exit, after a CUDA synchronise so the run's queued kernels finished while
    the thread still sampled. On CUDA, enter first empties torch's cache (blocks no tensor uses),
    so the NVML baseline is the memory live at that moment and not what earlier runs left cached. The thread is always stopped and joined at exit, also when the body
    raised. A sampler can be reused for successive runs, not nested. Torch kernels release the GIL,
    so sampling keeps pace; a pure-Python body is still sampled about every 5 ms (the
    interpreter's switch interval).
    """

    def __init__(self, device: str | torch.device = "cpu", interval_s: float = 0.005) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s!r}")
        self.device = resolve_device(device)
        self.interval_s = float(interval_s)
        self._thread: threading.Thread | None = None
        self._active = False
        self._reading: MemoryReading | None = None

    @property
    def reading(self) -> MemoryReading:
        if self._reading is None:
            raise RuntimeError("no reading yet: use the sampler as a context manager and read it after the block")
        return self._reading

    def __enter__(self) -> MemorySampler:
        if self._active:
            raise RuntimeError("this MemorySampler is already running; use one sampler per concurrent run")
        self._reading = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # earlier work must not leak into this run's peak
            # Hand the caching allocator's idle reserve back, so the NVML baseline does not hold
            # the blocks an earlier run left cached and this run's growth shows above it.
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self._probe, self._note = self._open_probe()
        self._baseline = self._read_baseline()
        self._peak, self._samples, self._error = self._baseline, 0, ""
        self._stop = threading.Event()
        self._start = time.perf_counter()
        if self._probe is not None:
            self._start_thread()
        self._active = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        finally:
            self._active = False
            stopped = self._stop_thread()
            self._reading = self._finish()
            if stopped and self._probe is not None:
                self._probe.close()  # a thread still inside NVML keeps its session

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._run, name=f"MemorySampler[{self.device}]", daemon=True)
        try:
            thread.start()
        except BaseException:
            self._probe.close()  # e.g. "can't start new thread": leave no NVML session behind
            raise
        self._thread = thread

    def _open_probe(self) -> tuple[_RssProbe | _NvmlProbe | None, str]:
        if self.device.type == "cpu":
            return _RssProbe(), ""
        return _open_nvml_probe(self.device.index)

    def _read_baseline(self) -> int | None:
        """The read at enter; if even that fails the source is dropped (and closed) with a note."""
        if self._probe is None:
            return None
        try:
            return self._probe.read()
        except Exception as err:
            self._probe.close()
            self._probe = None
            self._note = f"no memory source: first read failed: {type(err).__name__}: {err}"
            return None

    def _run(self) -> None:
        """Sample, then wait; a read that fails ends sampling (reported in `note`) but not the run."""
        try:
            while True:
                self._observe(self._probe.read())
                self._samples += 1
                if self._stop.wait(self.interval_s):
                    return
        except Exception as err:
            self._error = f"sampler stopped early after {self._samples} samples: {type(err).__name__}: {err}"

    def _observe(self, value: int) -> None:
        self._peak = value if self._peak is None else max(self._peak, value)

    def _stop_thread(self) -> bool:
        """Stop and join the sampling thread; False if it did not stop in time (a hung driver call)."""
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is None:
            return True
        thread.join(_JOIN_TIMEOUT_S)
        if thread.is_alive():
            self._error = f"sampler thread did not stop within {_JOIN_TIMEOUT_S} s; peak may be incomplete"
            return False
        return True

    def _finish(self) -> MemoryReading:
        duration = time.perf_counter() - self._start
        notes = [self._note, self._error]
        if self._probe is not None:
            try:
                self._observe(self._probe.read())
            except Exception as err:
                notes.append(f"final read failed: {type(err).__name__}: {err}")
        torch_peak, reserved_peak = self._torch_peaks(notes)
        return MemoryReading(
            device=str(self.device),
            source=self._probe.source if self._probe else "none",
            baseline_bytes=self._baseline,
            peak_bytes=self._peak,
            samples=self._samples,
            interval_s=self.interval_s,
            duration_s=duration,
            torch_peak_bytes=torch_peak,
            torch_reserved_peak_bytes=reserved_peak,
            nvml_device=self._probe.label if isinstance(self._probe, _NvmlProbe) else None,
            note="; ".join(n for n in notes if n),
        )

    def _torch_peaks(self, notes: list[str]) -> tuple[int | None, int | None]:
        if self.device.type != "cuda":
            return None, None
        try:
            return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)
        except Exception as err:
            notes.append(f"torch peak unavailable: {type(err).__name__}: {err}")
            return None, None


# ----------------------------------------------------------------------------------- tensor peak
CUDA_OBJECTIVE = "cuda allocator peak (measured)"
CPU_OBJECTIVE = "cpu tensor peak (measured, torch profiler)"
TENSOR_PEAK_SOURCE = "torch profiler, CPU tensors: weights, buffers and inputs + the run's peak"

# What torch writes to stderr around a profiled run that says nothing about it: kineto's start and
# stop marks, and the CPU allocator's note that it cannot report frees of blocks allocated before.
_PROFILER_NOISE = ("SyncActivityProfilerHandler", "Memory block of unknown size was allocated before")


@dataclass(frozen=True)
class TensorPeak:
    """CPU tensor bytes of one run: those live throughout it, and the most its own allocations held at once."""

    resident_bytes: int  # weights, buffers, inputs: distinct storages
    run_peak_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + self.run_peak_bytes


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`: tied weights and views are counted once."""
    sizes: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        sizes[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(sizes.values())


def tensor_peak(run: Callable[[], object], resident: Iterable[torch.Tensor]) -> TensorPeak:
    """Call `run` once under torch's profiler with memory profiling on: the peak of CPU tensor bytes
    live during it, as `resident` (tensors live before and after it, such as weights, buffers and
    inputs) plus the most the run's own allocations held at once.

    Exact to the byte: the CPU allocator reports every allocation and free to the profiler, kernel
    workspaces included (a `TorchDispatchMode` sees only what ops return, not the buffers kernels
    such as SDPA's allocate inside), and replaying the events in order gives the live bytes after
    each one. Deterministic: the same work makes the same allocations in the same order, and the
    garbage collector is paused during the run, so that when it would have run (which depends on
    what the process did before) cannot move a free (a full collection first costs 0.3 s in a
    process holding a model). Tensors are freed by reference counting: the peak of a `tiny`
    generate is the same with the collector paused and with it running after every allocation.
    Frees of blocks allocated before the run are not counted (their bytes are not either). Slower
    than an untracked run (a `tiny` generate: 0.23 s instead of 0.06 s): keep it out of timed
    regions. Raises RuntimeError when this torch's profiler gives no allocation events.
    """
    resident_bytes = storage_bytes(resident)
    activities = [torch.profiler.ProfilerActivity.CPU]
    collecting = gc.isenabled()
    gc.disable()
    try:
        with _quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True) as profile:
            run()
    finally:
        if collecting:
            gc.enable()
    try:
        tree = profile.profiler.kineto_results.experimental_event_tree()
        allocation = torch._C._profiler._ExtraFields_Allocation
    except AttributeError as err:
        raise RuntimeError(f"torch {torch.__version__}'s profiler gives no allocation events: {err}") from None
    events = [event for event in _walk(tree) if isinstance(event.extra_fields, allocation)]
    events.sort(key=lambda event: event.start_time_ns)  # stable: one thread's events keep their order
    live: dict[int, int] = {}
    now = peak = 0
    for event in events:
        fields = event.extra_fields
        if fields.device.type != "cpu":
            continue
        if fields.alloc_size > 0:
            live[fields.ptr] = fields.alloc_size
            now += fields.alloc_size
            peak = max(peak, now)
        elif fields.ptr in live:
            now -= live.pop(fields.ptr)
    return TensorPeak(resident_bytes, peak)


def _walk(roots: Iterable[Any]) -> Iterator[Any]:
    """Every event of the profiler's tree (depth first)."""
    stack = list(roots)
    while stack:
        event = stack.pop()
        yield event
        stack.extend(event.children)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send what is written to file descriptor 2 meanwhile to a temporary file, then write it back
    to `sys.stderr` without torch's profiler noise (`_PROFILER_NOISE`): nothing else is lost."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to guard
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines = sink.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not any(noise in line for noise in _PROFILER_NOISE))
            if kept:
                sys.stderr.write(kept)
