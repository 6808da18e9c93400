"""The CPU memory objective: the peak of live tensor bytes from torch's profiler, exact and
the same in another process; on the `tiny` backbone (a real transformers model) and on plain tensors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from profiler import TensorPeak, tensor_peak
from profiler.memory import storage_bytes

ROOT = Path(__file__).resolve().parents[2]
KIB = 1024

# One process: the tensor peaks (bytes) of the reference and of merged schedules on a 224x224 image, under
# SDPA and eager attention; the 77.8% schedule twice, so the second run follows other profiled runs.
SCRIPT = """
import json
from illava import Schedule
from profiler import Profiler, Workload

workload = Workload.from_dict({"name": "t", "image_size": [224, 224], "samples": 1, "output_tokens": 2})
peaks = {}
for attention, reductions in (("sdpa", (7 / 9, 8 / 9, 7 / 9)), ("eager", (7 / 9,))):
    profiler = Profiler("tiny", attn_implementation=attention, repeats=1, warmup=0)
    reference = profiler.reference(workload).peak_memory
    peaks[attention] = {"reference": reference["objective_bytes"], "resident": reference["tensor_resident_bytes"]}
    for reduction in reductions:
        memory = profiler.measure(Schedule.paper_default(reduction, encoder_depth=6, llm_depth=6), workload).peak_memory
        peaks[attention].setdefault(f"{reduction:.3f}", []).append(memory["objective_bytes"])
print(json.dumps(peaks))
"""


def test_the_tensor_peak_of_a_schedule_is_the_same_in_two_processes():
    # One thread each, so the two run side by side without contending (the figure depends on the thread
    # count: SDPA's CPU kernel sizes its workspace per thread).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err
        assert "USDT" not in err and "Memory block of unknown size" not in err  # torch's profiler noise is dropped
    first, second = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert first == second  # to the byte
    sdpa, eager = first["sdpa"], first["eager"]
    assert sdpa["0.778"][0] == sdpa["0.778"][1]  # and again in the same process, after other runs
    assert sdpa["0.889"][0] < sdpa["0.778"][0]  # more reduction, fewer tokens: a lower peak
    assert sdpa["0.889"][0] > sdpa["resident"] == eager["resident"] > 0  # weights, buffers, inputs
    # Eager attention holds every block's probabilities, unmerged or not: fewer tokens, a lower peak.
    assert eager["0.778"][0] < eager["reference"]
    # SDPA never holds the probabilities, but a merging encoder block recomputes them for importance
    # (heads x 256 queries x keys in float32, `illava.merge.attention_importance`): on `tiny` at 224x224,
    # whose activations and KV cache are a few hundred KiB, that chunk outweighs what merging saves.
    assert sdpa["0.778"][0] > sdpa["reference"]


def test_tensor_peak_replays_allocations_and_frees_in_order():
    def run():
        a = torch.ones(1024 * KIB, dtype=torch.uint8)
        b = torch.ones(2048 * KIB, dtype=torch.uint8)
        del a
        c = torch.ones(512 * KIB, dtype=torch.uint8)  # reuses nothing: 2.5 MiB live, below the 3 MiB before
        del b, c

    weights = torch.zeros(256, 64)
    peak = tensor_peak(run, [weights, weights.view(-1), weights[0]])  # views of one storage count once
    assert peak == TensorPeak(resident_bytes=weights.nbytes, run_peak_bytes=3072 * KIB)
    assert peak.peak_bytes == weights.nbytes + 3072 * KIB


def test_tensor_peak_sees_the_workspace_a_kernel_allocates_inside():
    # What a TorchDispatchMode would see of this call is its output; the CPU kernel also allocates buffers.
    q, k, v = (torch.randn(1, 4, 1024, 32) for _ in range(3))
    with torch.inference_mode():
        peak = tensor_peak(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), [])
    assert peak.run_peak_bytes > q.nbytes


def test_tensor_peak_keeps_what_the_run_writes_to_stderr_and_drops_the_profiler_noise(capfd):
    tensor_peak(lambda: os.write(2, b"the run's own line\n"), [])
    err = capfd.readouterr().err
    assert "the run's own line" in err
    assert "USDT" not in err and "Memory block of unknown size" not in err


def test_storage_bytes_counts_tied_tensors_once():
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # tied, as many language models tie their lm_head
    assert storage_bytes([embedding.weight, head.weight]) == 10 * 4 * 4
