"""The compute model: hand counts, monotonicity, the encoder/LLM split, and the real module shapes."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_window_index

import illava
from illava import predicted_speedup, prefill_flops
from illava.adapters._qwen_costs import Segment, segments_of, unit_costs, window_patch_counts
from illava.flops import causal_pairs, module_costs
from illava.schedule import PAPER_REDUCTIONS, Schedule, ScheduleError


def flops_of(config):
    """Per-unit costs of any family's config."""
    return module_costs(illava.adapter_for_config(config), config).units


IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 500, 501, 502, 503


def tiny_config() -> Qwen2_5_VLConfig:
    """4 vision blocks (full attention in 1 and 3, 8x8-patch windows) and a 4-layer GQA LLM."""
    return Qwen2_5_VLConfig(
        vision_config=dict(
            depth=4,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            out_hidden_size=64,
            fullatt_block_indexes=[1, 3],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        text_config=dict(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=512,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )


def paper(reduction: float, **overrides: object) -> Schedule:
    return Schedule.paper_default(reduction, encoder_depth=4, llm_depth=4, **overrides)


def test_vanilla_equals_hand_count() -> None:
    # A 12x8-patch image: 24 groups; 4-group (8-patch) windows tile it as 8x8 + 4x8 patches.
    flops = prefill_flops(tiny_config(), Schedule.vanilla(), [Segment(12, 8)], text_tokens=11)
    patches, windows = 96, (64, 32)
    linear_per_patch = 2 * (32 * 96 + 32 * 32) + 2 * (32 * 64 + 32 * 64 + 64 * 32)  # qkv, proj, gate, up, down
    windowed_block = patches * linear_per_patch + 2 * 2 * 32 * sum(w * w for w in windows)
    full_block = patches * linear_per_patch + 2 * 2 * 32 * patches**2
    assert flops.encoder_blocks == (windowed_block, full_block, windowed_block, full_block)
    assert flops.patch_embed == patches * 2 * (3 * 2 * 14 * 14) * 32
    assert flops.merger == 24 * 2 * (128 * 128 + 128 * 64)

    n = 24 + 11
    q, kv = 64, 2 * 16  # 4 query heads and 2 kv heads of head_dim 16
    layer = n * 2 * (64 * q + 64 * kv + 64 * kv + q * 64 + 3 * 64 * 128) + 2 * 2 * q * n * (n + 1) // 2
    assert flops.llm_layers == (layer,) * 4
    assert flops.lm_head == 2 * 64 * 512
    assert flops.llm_tokens == (n,) * 4
    assert flops.encoder_tokens == ((patches, patches),) * 4
    assert (
        flops.total
        == flops.encoder + flops.llm
        == sum(flops.encoder_blocks) + flops.patch_embed + flops.merger + 4 * layer + 2 * 64 * 512
    )


def test_flops_decrease_as_reduction_grows() -> None:
    config = tiny_config()
    counts = [prefill_flops(config, paper(r), [(1, 32, 32)], text_tokens=30) for r in (0.0, *PAPER_REDUCTIONS)]
    for before, after in zip(counts, counts[1:], strict=False):
        assert after.encoder < before.encoder
        assert after.llm < before.llm
        assert after.total < before.total
    assert counts[0] == prefill_flops(config, Schedule.vanilla(), [(1, 32, 32)], text_tokens=30)


def test_encoder_share_zero_leaves_the_encoder_alone() -> None:
    config = tiny_config()
    vanilla = prefill_flops(config, Schedule.vanilla(), [(1, 32, 32)], text_tokens=30)
    llm_only = prefill_flops(config, paper(7 / 9, encoder_share=0.0), [(1, 32, 32)], text_tokens=30)
    assert llm_only.encoder == vanilla.encoder
    assert llm_only.encoder_blocks == vanilla.encoder_blocks
    assert llm_only.llm < vanilla.llm


def test_encoder_share_one_leaves_the_llm_constant() -> None:
    config = tiny_config()
    schedule = paper(7 / 9, encoder_share=1.0)
    flops = prefill_flops(config, schedule, [(1, 32, 32)], text_tokens=30)
    after_encoder = schedule.plan(256).after_encoder
    assert after_encoder == 256 - 199
    assert flops.llm_tokens == (30 + after_encoder,) * 4
    assert len(set(flops.llm_layers)) == 1
    assert flops.encoder_tokens[-1][1] == 4 * after_encoder  # FFN of the last block (itself a merge block)
    assert flops.merger == after_encoder * unit_costs(config).merger


def test_merge_splits_a_block_between_attention_and_ffn() -> None:
    config = tiny_config()
    schedule = paper(2 / 3)
    plan = schedule.plan(256)
    flops = prefill_flops(config, schedule, [(1, 32, 32)], text_tokens=0)
    for step in plan.encoder:
        assert flops.encoder_tokens[step.layer] == (4 * step.tokens_in, 4 * step.kept)
    for layer, n_tokens in enumerate(flops.llm_tokens):
        assert n_tokens == plan.llm_tokens_at(layer)


def _linear_weights(module: nn.Module) -> int:
    """Weights (no biases) of every Linear and Conv3d inside `module`."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear | nn.Conv3d))


def test_unit_costs_follow_the_module_shapes() -> None:
    config = tiny_config()
    model = Qwen2_5_VLForConditionalGeneration(config)
    units = unit_costs(config)
    visual, language = model.model.visual, model.model.language_model
    for block in visual.blocks:
        assert units.vision_attn_linear == 2 * _linear_weights(block.attn)
        assert units.vision_ffn == 2 * _linear_weights(block.mlp)
    for layer in language.layers:
        assert units.llm_linear == 2 * _linear_weights(layer)
        attn = layer.self_attn
        assert units.llm_pair == 2 * 2 * attn.num_heads * attn.head_dim
    assert units.patch_embed == 2 * _linear_weights(visual.patch_embed)
    assert units.merger == 2 * _linear_weights(visual.merger)
    assert units.lm_head == 2 * _linear_weights(model.lm_head)
    assert units.vision_pair == 2 * 2 * visual.blocks[0].attn.num_heads * visual.blocks[0].attn.head_dim
    # Nothing with weights is left out of the model.
    counted = (
        config.vision_config.depth * (units.vision_attn_linear + units.vision_ffn)
        + config.text_config.num_hidden_layers * units.llm_linear
        + units.patch_embed
        + units.merger
        + units.lm_head
    )
    assert counted == 2 * _linear_weights(model)


def test_vanilla_matches_torch_flop_counter() -> None:
    """Eager attention runs every matmul visibly, so torch's counter sees the whole prefill: the
    encoder must match exactly; the LLM does dense masked n**2 attention instead of n(n+1)/2."""
    config = tiny_config()
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    grid = torch.tensor([[1, 12, 8], [2, 4, 20]])  # an image of 24 tokens and two 20-token frames
    image = [VISION_START] + [IMAGE_TOKEN] * 24 + [VISION_END]
    frames = [VISION_START] + [IMAGE_TOKEN] * 40 + [VISION_END]
    input_ids = torch.tensor([[3, 4, *image, 5, *frames, 6, 7]])
    pixel_values = torch.randn(96 + 160, 3 * 2 * 14 * 14)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid, logits_to_keep=1)
    measured = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    prefix = "Qwen2_5_VLForConditionalGeneration"

    flops = prefill_flops(config, Schedule.vanilla(), grid, text_tokens=input_ids.shape[1] - 64)
    pair = unit_costs(config).llm_pair
    dense_llm = sum(flops.llm_layers) + sum((n * n - causal_pairs(n)) * pair for n in flops.llm_tokens)
    assert measured[f"{prefix}.model.visual"] == flops.encoder
    assert measured[f"{prefix}.model.language_model"] == dense_llm
    assert measured[f"{prefix}.lm_head"] == flops.lm_head


@pytest.mark.parametrize("grid", [(1, 12, 8), (1, 16, 16), (1, 6, 22), (3, 10, 14), (1, 2, 2)])
def test_windows_tile_like_transformers(grid: tuple[int, int, int]) -> None:
    config = tiny_config()
    vision = config.vision_config
    _, cu_window_seqlens = get_vision_window_index(
        torch.tensor([grid]), vision.spatial_merge_size, vision.window_size, vision.patch_size
    )
    expected = torch.diff(cu_window_seqlens).tolist()
    ours = [n for segment in segments_of([grid], 2) for n in window_patch_counts(config, segment)]
    assert ours == expected


def test_video_grid_is_one_segment_per_frame() -> None:
    config = tiny_config()
    schedule = paper(7 / 9)
    as_grid = prefill_flops(config, schedule, [(3, 16, 16)], text_tokens=5)
    as_segments = prefill_flops(config, schedule, [Segment(16, 16)] * 3, text_tokens=5)
    assert as_grid == as_segments
    kept = schedule.plan(64).kept
    assert as_grid.llm_tokens[-1] == 5 + 3 * kept


def test_predicted_speedup() -> None:
    config = tiny_config()
    assert predicted_speedup(config, Schedule.vanilla(), [(1, 32, 32)], 30) == 1.0
    speedups = [predicted_speedup(config, paper(r), [(1, 32, 32)], 30) for r in PAPER_REDUCTIONS]
    assert 1.0 < speedups[0] < speedups[1] < speedups[2]


@pytest.mark.parametrize(("n_tokens", "window"), [(1, None), (7, None), (7, 3), (3, 7), (10, 10)])
def test_causal_pairs_counts_visible_keys(n_tokens: int, window: int | None) -> None:
    visible = [
        sum(1 for key in range(query + 1) if window is None or query - key < window) for query in range(n_tokens)
    ]
    assert causal_pairs(n_tokens, window) == sum(visible)


def test_bad_input_gets_a_clear_error() -> None:
    config = tiny_config()
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        prefill_flops(config, Schedule.vanilla(), [(1, 13, 8)], text_tokens=1)
    with pytest.raises(ValueError, match=r"\(t, h, w\)"):
        prefill_flops(config, Schedule.vanilla(), [(12, 8)], text_tokens=1)
    with pytest.raises(ValueError, match="text_tokens"):
        prefill_flops(config, Schedule.vanilla(), [(1, 12, 8)], text_tokens=-1)
    with pytest.raises(ScheduleError, match="out of range"):
        prefill_flops(config, Schedule.paper_default(7 / 9), [(1, 12, 8)], text_tokens=1)


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-llava-onevision"])
def test_every_family_matches_torch_flop_counter(name: str) -> None:
    """The whole unmerged prefill of each family, image and video, against torch's counter (eager
    attention: the LLM does dense masked n**2 attention, so that is what is compared)."""
    from illava.backbones import load_backbone
    from illava.inputs import Sample, build_inputs, synthetic_image, synthetic_video

    backbone = load_backbone(name, attn_implementation="eager")
    side = max(backbone.adapter.size_multiple(backbone.model.config), 28)
    sample = Sample("<image> and <video>: what moves?", [synthetic_image((6 * side, 4 * side), 1)],
                    [synthetic_video(4, 4 * side, seed=2)])  # fmt: skip
    batch = build_inputs(backbone, [sample])
    grids, text_tokens = backbone.adapter.flop_inputs(backbone.model.config, batch)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone.model(**batch, logits_to_keep=1)
    flops = prefill_flops(backbone.model.config, Schedule.vanilla(), grids, text_tokens)
    pair = flops_of(backbone.model.config).llm_pair
    dense_llm = sum(flops.llm_layers) + sum((n * n - causal_pairs(n)) * pair for n in flops.llm_tokens)
    assert counter.get_total_flops() == flops.encoder + dense_llm + flops.lm_head
    assert flops.llm_tokens[0] == batch["input_ids"].shape[1]


FAMILIES = ["tiny", "tiny-qwen2-vl", "tiny-qwen3-vl", "tiny-llava-onevision"]
#: Every registered method, and iLLaVA's text-guided variant.
METHODS = [*illava.method_names(), "illava+text"]


@pytest.fixture(scope="module", params=FAMILIES)
def backbone(request):
    from illava.backbones import load_backbone

    return load_backbone(request.param)


def placed(model, method: str) -> Schedule:
    """The paper default at 77.8%, on the stages `method` acts at (how seeds and comparisons place it)."""
    paper = illava.paper_default_for(model, 7 / 9)
    if method == "illava+text":
        return paper.with_(text_guided=True)
    return illava.get_method(method).placement(paper)


@pytest.mark.parametrize("method", METHODS)
def test_merged_counts_in_the_flop_model_follow_the_engine(backbone, method: str) -> None:
    """The tokens the FLOP model assumes in every vision block (attention and FFN) and every decoder
    layer are the ones a merged prefill of two images in one prompt runs with, for every method. A
    ``downsample`` schedule is the unmerged model on the resized images; the FLOP model counts it from
    the full-resolution grids."""
    from illava.inputs import Sample, build_inputs, synthetic_image

    model = backbone.model
    schedule = placed(model, method)
    side = max(backbone.adapter.size_multiple(model.config), 28)
    sample = Sample("<image> and <image>: which?", [synthetic_image((6 * side, 4 * side), 1),
                                                   synthetic_image(4 * side, 2)])  # fmt: skip
    full = build_inputs(backbone, [sample])
    grids, text_tokens = backbone.adapter.flop_inputs(model.config, full)
    flops = prefill_flops(model.config, schedule, grids, text_tokens)
    downsampled = schedule.method == "downsample"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", illava.DownsampleWarning)
        illava.apply(model, Schedule.vanilla() if downsampled else schedule)
    try:
        with torch.no_grad():
            model(**(build_inputs(backbone, [sample], schedule=schedule) if downsampled else full))
        stats = illava.last_stats(model)
    finally:
        illava.remove(model)
    assert list(flops.llm_tokens) == [int(n) for (n,) in stats.llm_sequence]
    unit = getattr(model.config.vision_config, "spatial_merge_size", 1) ** 2  # patches per LLM token
    entering = [unit * sum(units) for units in stats.encoder_units]  # patches entering each block
    assert [attention for attention, _ in flops.encoder_tokens] == entering
    assert [ffn for _, ffn in flops.encoder_tokens][:-1] == entering[1:]  # a merge sits before the FFN
    if downsampled and backbone.adapter.family != "llava_onevision":  # which keeps one tile per image of several
        assert flops.llm_tokens[0] < prefill_flops(model.config, Schedule.vanilla(), grids, text_tokens).llm_tokens[0]
