"""The profiler (`profiler.Profiler`) on CUDA, bf16, sdpa: the unmerged reference and the paper's
default at 66.7/77.8/88.9% per image size, with latency, stage times (CUDA events), decode speed
and peak memory (torch allocator peaks and NVML device memory). One JSON line per measurement.

    python benchmarks/gpu_profile_sweep.py OUT.json BACKBONE REPEATS SIZE [SIZE ...]
    BATCH=8 TOKENS=4 python benchmarks/gpu_profile_sweep.py out.json 7b-shape 5 448 896

BACKBONE is `small`, `tiny` or `7b-shape` (see benchmarks/prefill.py); BATCH (default 1) is the
batch size and the number of samples (at least 2); TOKENS (default 16) the generated tokens.
This is the script docs/benchmarks.md's GPU section ran (then as .gpu/profile_sweep.py).
"""

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import illava  # noqa: E402
from profiler import Profiler, resolve_workload  # noqa: E402

out_path, name, repeats, sizes = sys.argv[1], sys.argv[2], int(sys.argv[3]), [int(x) for x in sys.argv[4:]]
batch = int(os.environ.get("BATCH", "1"))
tokens = int(os.environ.get("TOKENS", "16"))
if name == "7b-shape":
    import prefill

    backbone = prefill.seven_b_shape("sdpa", torch.bfloat16, torch.device("cuda"))
else:
    backbone = name
p = Profiler(backbone, device="cuda", dtype=torch.bfloat16, repeats=repeats, warmup=2)
print("weights GiB", torch.cuda.memory_allocated() / 2**30, flush=True)
out = {"hardware": p.hardware.to_dict(), "backbone": name, "rows": []}
for size in sizes:
    w = dataclasses.replace(
        resolve_workload("single-448"),
        name=f"single-{size}" + (f"-batch{batch}" if batch > 1 else ""),
        image_size=(size, size),
        samples=max(2, batch),
        batch_size=batch,
        output_tokens=tokens,
    )
    t = time.time()
    ref = p.reference(w)
    schedules = [("vanilla", None)] + [
        (f"iLLaVA {r:.1%}", illava.paper_default_for(p.model, r)) for r in illava.PAPER_REDUCTIONS
    ]
    for label, sched in schedules:
        m = ref if sched is None else p.measure(sched, w)
        pm = m.peak_memory

        def mib(key, pm=pm):
            return None if pm[key] is None else pm[key] / 2**20

        row = dict(
            backbone=name, workload=w.name, schedule=label,
            prefill_ms=m.prefill_s.median * 1e3, prefill_low_ms=m.prefill_s.low * 1e3,
            prefill_high_ms=m.prefill_s.high * 1e3, encoder_ms=m.encoder_s.median * 1e3,
            merger_ms=m.merger_s.median * 1e3, llm_ms=m.llm_s.median * 1e3,
            decode_tok_s=m.decode_tokens_per_s, samples_per_s=m.samples_per_s,
            image_tokens_to_llm=m.image_tokens_to_llm, tokens_per_llm_layer=m.tokens_per_llm_layer,
            torch_peak_mib=mib("torch_peak_bytes"), torch_reserved_peak_mib=mib("torch_reserved_peak_bytes"),
            nvml_baseline_mib=mib("baseline_bytes"), nvml_peak_mib=mib("peak_bytes"),
            nvml_above_baseline_mib=mib("peak_above_baseline_bytes"),
            nvml_samples=pm["samples"], source=pm["source"], note=pm["note"],
            first_token_agreement=m.fidelity.first_token_agreement, kl=m.fidelity.mean_kl,
            elapsed_s=time.time() - t,
        )  # fmt: skip
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
        Path(out_path).write_text(json.dumps(out, indent=1))
