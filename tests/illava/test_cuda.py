"""The patch on a CUDA device: the same guarantees as on CPU (zero reduction is the unpatched
model, batches and cached generation work, counts follow the plan), in fp32, bf16 and fp16, with
sdpa and eager attention (flash-attn when installed). Skipped where torch sees no CUDA device."""

import pytest
import torch

import illava
from illava import PAPER_REDUCTIONS, Schedule
from illava.backbones import load_backbone
from illava.inputs import Sample, build_inputs, synthetic_image, synthetic_video

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
# Largest |logit difference| allowed between two computations of the same model that may use
# different kernels (the logits of the seeded built-ins are within about +-3).
ATOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
CONFIGS = [
    ("sdpa", torch.float32),
    ("sdpa", torch.bfloat16),
    ("sdpa", torch.float16),
    ("eager", torch.bfloat16),
    ("eager", torch.float16),
]


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _load(name, attn, dtype):
    backbone = load_backbone(name, attn_implementation=attn, dtype=dtype)
    backbone.model.to(CUDA)
    return backbone


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"{c[0]}-{str(c[1]).removeprefix('torch.')}")
def small(request):
    backbone = _load("small", *request.param)
    yield backbone
    illava.remove(backbone.model)
    del backbone
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def tiny_fp32():
    return _load("tiny", "sdpa", torch.float32)


@pytest.fixture(autouse=True)
def _unpatched(request):
    yield
    for name in ("small", "tiny_fp32"):
        if name in request.fixturenames:
            illava.remove(request.getfixturevalue(name).model)


def inputs(backbone, *samples):
    return build_inputs(backbone, list(samples)).to(CUDA)


def dtype_of(backbone):
    return backbone.model.dtype


TWO = (
    Sample("<image> What is in the picture?", [synthetic_image(448, 0)]),
    Sample("Describe <image> in one long sentence, please, with every colour.", [synthetic_image((336, 224), 2)]),
)


@torch.no_grad()
def test_zero_reduction_equals_unpatched(small):
    batch = inputs(small, *TWO)
    reference = small.model(**batch).logits
    illava.apply(small.model, Schedule.vanilla())
    merged = small.model(**batch).logits
    valid = batch["attention_mask"].bool()
    assert merged.device.type == "cuda" and torch.isfinite(merged[valid]).all()
    torch.testing.assert_close(merged[valid], reference[valid], rtol=0, atol=ATOL[dtype_of(small)])


@torch.no_grad()
@pytest.mark.parametrize("reduction", PAPER_REDUCTIONS)
def test_merged_prefill_is_finite_and_counts_follow_the_plan(small, reduction):
    model = small.model
    schedule = illava.paper_default_for(model, reduction)
    illava.apply(model, schedule)
    out = model(**inputs(small, *TWO))
    assert torch.isfinite(out.logits[:, -1]).all()
    stats = illava.last_stats(model)
    plans = [schedule.plan(256), schedule.plan(12 * 8)]  # 448x448 -> 16x16 groups, 336x224 -> 12x8
    assert [k.numel() for k in stats.kept_units] == [p.after_encoder for p in plans]
    assert stats.llm_image_tokens[-1].tolist() == [p.kept for p in plans]
    assert all(t.device.type == "cuda" for t in stats.kept_units)


@torch.no_grad()
def test_merged_generate_with_a_batch_of_two(small):
    model = small.model
    illava.apply(model, illava.paper_default_for(model, 7 / 9))
    batch = inputs(small, *TWO)
    out = model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)  # fmt: skip
    assert out.sequences.shape == (2, batch["input_ids"].shape[1] + 6)
    assert all(torch.isfinite(step).all() for step in out.logits)  # raw logits (scores carry min_new_tokens' -inf)
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    assert ((new >= 0) & (new < model.config.text_config.vocab_size)).all()


@torch.no_grad()
def test_batch_of_two_equals_each_alone_fp32(tiny_fp32):
    model = tiny_fp32.model
    samples = [
        Sample("<image> Short?", [synthetic_image(224, 1)]),
        Sample("A longer question about <image> and the colours of every shape.", [synthetic_image((168, 112), 4)]),
    ]
    illava.apply(model, illava.paper_default_for(model, 7 / 9))
    kwargs = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    together = model.generate(**inputs(tiny_fp32, *samples), **kwargs)
    for row, sample in enumerate(samples):
        alone = model.generate(**inputs(tiny_fp32, sample), **kwargs)
        assert torch.equal(together.sequences[row, -5:], alone.sequences[0, -5:])
        for a, b in zip(together.scores, alone.scores):
            torch.testing.assert_close(a[row], b[0], rtol=0, atol=1e-3)


@torch.no_grad()
def test_cached_generation_equals_recompute_fp32(tiny_fp32):
    model = tiny_fp32.model
    batch = inputs(tiny_fp32, *TWO)
    illava.apply(model, illava.paper_default_for(model, 7 / 9))
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(**batch, **kwargs)
    recomputed = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


@torch.no_grad()
def test_cuda_matches_cpu_fp32(tiny_fp32):
    """The same merge on both devices: the same tokens kept and the same logits."""
    cpu = load_backbone("tiny", attn_implementation="sdpa", dtype=torch.float32)
    schedule = illava.paper_default_for(cpu.model, 7 / 9)
    sample = Sample("<image> What colour is the circle?", [synthetic_image(224, 1)])
    results = []
    for backbone, device in ((cpu, torch.device("cpu")), (tiny_fp32, CUDA)):
        illava.apply(backbone.model, schedule)
        logits = backbone.model(**build_inputs(backbone, [sample]).to(device)).logits
        results.append((logits.cpu(), [k.cpu() for k in illava.last_stats(backbone.model).kept_units]))
        illava.remove(backbone.model)
    (cpu_logits, cpu_kept), (gpu_logits, gpu_kept) = results
    assert all(torch.equal(a, b) for a, b in zip(cpu_kept, gpu_kept))
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=0, atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("method", ["prune", "random"])
def test_baseline_methods_on_cuda(tiny_fp32, method):
    model = tiny_fp32.model
    illava.apply(model, illava.paper_default_for(model, 7 / 9, method=method))
    out = model(**inputs(tiny_fp32, *TWO))
    assert torch.isfinite(out.logits[:, -1]).all()


@torch.no_grad()
def test_video_and_merge_timing_on_cuda(tiny_fp32):
    model = tiny_fp32.model
    illava.apply(model, illava.paper_default_for(model, 7 / 9))
    illava.time_merges(model)
    batch = inputs(tiny_fp32, Sample("<video> What moves?", videos=[synthetic_video(4, 112, seed=7)]))
    out = model(**batch)
    assert torch.isfinite(out.logits).all()
    assert illava.last_stats(model).merge_seconds > 0


@pytest.mark.skipif(not _flash_available(), reason="flash-attn is not installed")
@torch.no_grad()
def test_flash_attention_zero_reduction_and_merged_generate():
    backbone = _load("small", "flash_attention_2", torch.bfloat16)
    batch = inputs(backbone, *TWO)
    reference = backbone.model(**batch).logits
    illava.apply(backbone.model, Schedule.vanilla())
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(backbone.model(**batch).logits[valid], reference[valid], rtol=0, atol=3e-2)
    illava.apply(backbone.model, illava.paper_default_for(backbone.model, 7 / 9))
    out = backbone.model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2


# ----------------------------------------------------------------------------------- the packed attention
@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def packed_pair(request):
    """`small` with sdpa and with illava_packed, which on CUDA in half precision runs ragged blocks
    through torch's varlen attention."""
    pair = _load("small", "sdpa", request.param), _load("small", "illava_packed", request.param)
    yield pair
    for backbone in pair:
        illava.remove(backbone.model)
    del pair
    torch.cuda.empty_cache()


@torch.no_grad()
def test_packed_attention_on_cuda_equals_sdpa(packed_pair):
    sdpa, packed = packed_pair
    batch = inputs(sdpa, *TWO)
    valid = batch["attention_mask"].bool()
    atol = ATOL[dtype_of(sdpa)]
    reference = sdpa.model(**batch).logits
    illava.apply(packed.model, Schedule.vanilla())
    torch.testing.assert_close(packed.model(**batch).logits[valid], reference[valid], rtol=0, atol=atol)
    schedule = illava.paper_default_for(sdpa.model, 7 / 9)
    illava.apply(sdpa.model, schedule)
    illava.apply(packed.model, schedule)
    merged_sdpa, merged_packed = sdpa.model(**batch).logits, packed.model(**batch).logits
    kept_sdpa, kept_packed = illava.last_stats(sdpa.model).kept_units, illava.last_stats(packed.model).kept_units
    if all(torch.equal(a, b) for a, b in zip(kept_sdpa, kept_packed)):  # half precision may flip a kept token
        torch.testing.assert_close(merged_packed[:, -1], merged_sdpa[:, -1], rtol=0, atol=4 * atol)
    assert torch.isfinite(merged_packed[:, -1]).all()


@torch.no_grad()
def test_packed_attention_on_cuda_one_call_per_block_and_no_added_reads(packed_pair):
    from profiler.counts import count_call

    _, packed = packed_pair
    model = packed.model
    batch = inputs(packed, Sample("<image> What?", [synthetic_image(896, 0)]))

    def forward():
        model(**batch, logits_to_keep=1)

    illava.apply(model, Schedule.vanilla())
    forward()
    unmerged = count_call(forward)
    illava.apply(model, illava.paper_default_for(model, 7 / 9))
    forward()
    merged = count_call(forward)
    encoder_depth, llm_depth = illava.depths(model)
    assert unmerged.attention_calls == merged.attention_calls == encoder_depth + llm_depth
    assert merged.host_reads <= unmerged.host_reads, (merged.reads, unmerged.reads)
