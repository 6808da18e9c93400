"""A compute model of a schedule: FLOPs of a vision encoder and LLM prefill, per family.

Why this exists: a measured speedup only means something next to the speedup the token counts
*predict*. If the two disagree, either the engine does not remove what the plan says, or the
hardware does not turn fewer FLOPs into less time (memory-bound kernels, launch overhead, the
cost of scoring tokens). This module is the prediction; each backbone adapter reads every size
off its model config so it follows the real module shapes (a test checks that against an
instantiated model), and this module holds what all families share.

What is counted (a multiply-add is 2 FLOPs):

* every linear layer and the patch-embedding convolution: ``2 * in * out`` per token (biases ignored);
* attention's quadratic part: ``QK^T`` and ``AV`` cost ``2 * 2 * d`` per (query, key) pair, where
  ``d = heads * head_dim`` counts *query* heads (GQA shares K/V but every query head still does
  its own products);
* the projector on the tokens that leave the encoder, and ``lm_head`` on the last prompt token only
  (what ``generate`` computes at prefill).

Which family a config is of, and so how its tokens are laid out, is the adapter's business:
`illava.prefill_flops` and `illava.predicted_speedup` dispatch to the adapter's ``flops``, which
builds on the helpers here.

What is not: norms, rotary embeddings, softmax, activations, residual adds, embedding lookups
(all linear in the token count and small next to the matmuls), and the cost of the merge itself
(importance scores, recycling), which is what a measurement adds on top of this ideal.

Token bookkeeping follows `illava.schedule`: a plan counts LLM tokens, an encoder merge at block
``b`` sits between its attention and its FFN, an LLM merge after layer ``i`` shortens layers
``i+1..``. Every image, video frame or tile is a segment with its own plan.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from illava.schedule import Plan


@dataclass(frozen=True)
class UnitCosts:
    """FLOPs per unit of work, read off a config; the prefill total is these times token counts.

    Kept as a separate object so tests can hold each number against the parameter count of the
    module it stands for.
    """

    patch_embed: float  # per patch: the patch-embedding convolution
    vision_attn_linear: float  # per patch entering a block: q, k, v + output projection
    vision_ffn: float  # per patch after a block's merge
    vision_pair: float  # per (query, key) pair in a vision attention segment: QK^T + AV
    merger: float  # per LLM token leaving the encoder: the projector
    llm_linear: float  # per token per decoder layer: q, k, v, o + gate, up, down
    llm_pair: float  # per (query, key) pair in a decoder layer: QK^T + AV
    lm_head: float  # per token that gets logits


@dataclass(frozen=True)
class Flops:
    """Prefill FLOPs of one input under one schedule, per stage, plus the token counts behind them."""

    patch_embed: float
    encoder_blocks: tuple[float, ...]  # per vision block
    merger: float
    llm_layers: tuple[float, ...]  # per decoder layer
    lm_head: float
    encoder_tokens: tuple[tuple[int, int], ...]  # patches in (attention, FFN) of each block, all segments
    llm_tokens: tuple[int, ...]  # sequence length entering each decoder layer (text + image)

    @property
    def encoder(self) -> float:
        return self.patch_embed + sum(self.encoder_blocks) + self.merger

    @property
    def llm(self) -> float:
        return sum(self.llm_layers) + self.lm_head

    @property
    def total(self) -> float:
        return self.encoder + self.llm


def int_field(config: Any, name: str) -> int:
    """A config size that must be a plain positive int here (the modules assume so)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{type(config).__name__}.{name} = {value!r}: the FLOP model needs a positive int")
    return value


@dataclass(frozen=True)
class CostModules:
    """The modules whose shapes set a family's per-token costs (an adapter's `cost_modules`)."""

    patch_embed: Any  # the patch-embedding convolution: 2 * weight.numel() FLOPs per patch
    vision_attention: Any  # one block's attention projections, per patch
    vision_ffn: Any  # one block's MLP, per patch
    vision_width: int  # heads * head_dim of vision attention
    merger: Any  # the projector, per LLM token leaving the encoder
    decoder_layer: Any  # one decoder layer's projections and MLP, per token
    q_width: int  # query heads * head_dim of decoder attention
    lm_head: Any
    taps: dict[int, Any]  # block -> module run on the tokens leaving that block (DeepStack mergers)


@dataclass(frozen=True)
class ModuleCosts:
    units: UnitCosts
    taps: dict[int, float]  # block -> FLOPs per LLM token leaving it


def linear_flops(module: Any) -> float:
    """2 * in * out summed over the linear layers of `module`: its FLOPs per token (biases ignored)."""
    import torch

    return float(sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear)))


def module_costs(adapter: Any, config: Any) -> ModuleCosts:
    """Per-unit costs read off the modules of a model built from `config` on the meta device (no
    memory, no initialisation) by the family's `adapter`, so they follow the real module shapes by
    construction."""
    return _module_costs(adapter, type(config), config.to_json_string(use_diff=False))


@functools.lru_cache(maxsize=16)
def _module_costs(adapter: Any, config_class: type, config_json: str) -> ModuleCosts:
    import json

    import torch

    config = config_class.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = adapter.classes()[0]._from_config(config)
    modules = adapter.cost_modules(model)
    units = UnitCosts(
        patch_embed=2.0 * modules.patch_embed.weight.numel(),
        vision_attn_linear=linear_flops(modules.vision_attention),
        vision_ffn=linear_flops(modules.vision_ffn),
        vision_pair=2.0 * 2 * modules.vision_width,
        merger=linear_flops(modules.merger),
        llm_linear=linear_flops(modules.decoder_layer),
        llm_pair=2.0 * 2 * modules.q_width,
        lm_head=linear_flops(modules.lm_head),
    )
    return ModuleCosts(units, {block: linear_flops(module) for block, module in modules.taps.items()})


def causal_pairs(n_tokens: int, window: int | None = None) -> int:
    """(query, key) pairs a causal prefill of `n_tokens` computes: query ``i`` sees keys ``0..i``,
    i.e. ``n(n+1)/2``, or at most `window` keys under sliding-window attention. Kernels that skip
    fully masked tiles (flash attention, SDPA's causal path) do about this much work; a dense
    masked matmul does ``n**2``, so on such backends the prediction is optimistic."""
    if window is None or n_tokens <= window:
        return n_tokens * (n_tokens + 1) // 2
    return window * (window + 1) // 2 + (n_tokens - window) * window


def llm_layers(
    config: Any, units: UnitCosts, plans: list[Plan], text_tokens: int
) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """FLOPs and sequence length of every decoder layer at prefill."""
    text = config.text_config
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    flops, tokens = [], []
    for layer in range(text.num_hidden_layers):
        n_tokens = text_tokens + sum(plan.llm_tokens_at(layer) for plan in plans)
        window = text.sliding_window if layer_types[layer] == "sliding_attention" else None
        flops.append(n_tokens * units.llm_linear + causal_pairs(n_tokens, window) * units.llm_pair)
        tokens.append(n_tokens)
    return tuple(flops), tuple(tokens)
