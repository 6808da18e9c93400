"""``illava_packed``: one attention call per vision block, for merged and unmerged models alike.

With ``sdpa`` a windowed vision block calls the kernel once per window (Qwen2.5-VL: 64 windows per
block on an 896x896 image), and a video block once per frame; on a GPU each call is a launch, so the
encoder costs per window, not per token, and merging tokens cannot make it cheaper. This module
registers an attention implementation (transformers' `AttentionInterface`, and the matching mask
function) that runs every window or segment of a block in one call:

* equal-length segments (windows of an unmerged image): one batched SDPA call;
* ragged ones (after a merge, or edge windows), on CUDA: torch's varlen attention
  (`torch.nn.attention.varlen.varlen_attn`); elsewhere: one padded, key-masked SDPA call. A segment
  a merge emptied costs nothing and breaks nothing.

Everything else (decoder layers, SigLIP's tile batches, any call without segment boundaries) is plain
SDPA, so ``illava_packed`` can be any config's implementation.

Proportional attention (ToMe): a block whose tokens carry sizes (how many original tokens each merged
one stands for) adds ``log(size)`` of every key to the logits, whatever the model's configured
implementation. The engine routes such a block here (`run_packed` with a `Route` whose ``key_bias``
lays the biases out like the call's keys); each path takes the bias as an additive float mask (the
varlen kernel takes none, so ragged segments go through the padded call).

How it gets one call per block: transformers' packed vision attentions hand their kernel the whole
block (``cu_seqlens``) only on their flash-attention path, and split it into one call per segment
otherwise. The engine (`run_packed`) routes a vision attention module, for the duration of a block,
to ``illava_packed_varlen`` -- the same function under a name that reads as flash to that check --
and passes the block's host-known bounds along. Models the engine runs (merged, or applied with a
schedule that removes nothing: the fair unmerged reference) therefore make one call per block; the
library's own loop on an unpatched model makes one call per segment, each through SDPA.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

PACKED = "illava_packed"
PACKED_VARLEN = "illava_packed_varlen_flash"  # "flash" in the name: see the module docstring
#: The name `capture` gives a packed call it records (its function is the capture's): a module under
#: it takes the block's bounds like the packed kernel it ends up calling.
PACKED_CAPTURE = "illava_capture_packed_flash"
ROUTE = "_illava_route"  # where `run_packed` leaves a `Route` on the module for the kernel


@dataclass(frozen=True)
class Route:
    """What the engine hands the packed kernel for one block besides the module's own arguments."""

    bounds: Any = None  # the block's attention `Bounds` (host-known sizes, where there are)
    #: ``key_bias(batch, length)`` -> (batch, length) float: the additive logit bias of every key of a
    #: call whose keys are (batch, heads, length, dim) -- ``log(size)`` for proportional attention.
    key_bias: Callable[[int, int], torch.Tensor] | None = None


def _varlen_available(query: torch.Tensor) -> bool:
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.9, CUDA builds)
    except ImportError:
        return False
    return True


def _segments(cu: torch.Tensor, bounds: Any, n: int) -> tuple[list[int] | None, int]:
    """(host lengths or None, a host bound on the longest) of the segments `cu` describes."""
    if bounds is not None:
        host = bounds.host
        lengths = [b - a for a, b in zip(host[:-1], host[1:])] if host is not None else None
        return lengths, bounds.longest
    return None, n


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    illava_bounds: Any = None,
    illava_importance: list | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query/key/value (B, H, L, D). With `cu_seq_lens_q` (a packed vision block: B = 1, bidirectional
    attention within each segment) all segments in one call; otherwise SDPA. Returns (B, L, H, D).

    With `illava_importance` (a list, from the engine's capture of a merging block) the block's
    attention is computed explicitly, once, and the column mean of each segment's attention
    probabilities -- iLLaVA's importance, per token -- is appended to it: importance comes from the
    attention the block computes anyway, not from a second softmax(QK^T).

    With a `Route` on the module (`run_packed`) its bounds stand in for `illava_bounds`, and its
    ``key_bias`` is added to every key's logits (proportional attention)."""
    for name in ("cu_seq_lens_k", "max_length_k", "position_ids"):
        kwargs.pop(name, None)
    route: Route | None = module.__dict__.get(ROUTE)
    make_bias = route.key_bias if route is not None else None
    if route is not None and illava_bounds is None:
        illava_bounds = route.bounds
    if cu_seq_lens_q is None:
        if make_bias is not None:  # a batch (SigLIP's tiles): the bias joins the key-padding mask
            attention_mask = _with_key_bias(attention_mask, make_bias(key.shape[0], key.shape[2]), query.dtype)
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("illava_packed: a packed call takes one sequence (batch 1) and no mask")
    heads, n = query.shape[1], query.shape[2]
    key_bias = make_bias(1, n)[0] if make_bias is not None else None  # (N,) float
    lengths, longest = _segments(cu_seq_lens_q, illava_bounds, n)
    if max_length_q is not None:
        longest = min(longest, int(max_length_q))
    if illava_importance is not None:
        out, importance = _explicit(
            query, key, value, cu_seq_lens_q, lengths, longest, scaling, key_bias, illava_bounds
        )
        illava_importance.append(importance)
        return out, None
    if lengths is not None and len(set(lengths)) == 1:  # equal windows: one batched call, no padding
        segments, length = len(lengths), lengths[0]
        q, k, v = (t[0].view(t.shape[1], segments, length, -1).transpose(0, 1) for t in (query, key, value))
        mask = None if key_bias is None else key_bias.view(segments, 1, 1, length).to(query.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling
        )
        return out.transpose(0, 1).reshape(heads, n, -1).transpose(0, 1)[None], None  # (1, N, H, D)
    if key_bias is None and _varlen_available(query):
        from torch.nn.attention.varlen import varlen_attn

        cu = cu_seq_lens_q.to(torch.int32)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, H, D)
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling)
        return out[None], None
    layout = _layout(cu_seq_lens_q, illava_bounds, longest, n)
    return _padded(query, key, value, layout, scaling, dropout, key_bias), None


@dataclass(frozen=True)
class PaddedLayout:
    """Ragged segments of a packed sequence of N tokens as an (S, L) padded batch, L a host-known bound
    on their lengths. Built on the device from ``cu`` (nothing read back) and, through the engine's
    `Bounds`, once per set of bounds: every block until the next merge reuses it."""

    index: torch.Tensor  # (S, L) long: the token in each slot (padding: token 0, masked)
    real: torch.Tensor  # (S, L) bool: slots that hold a token
    sizes: torch.Tensor  # (S,) long: tokens per segment
    allowed: torch.Tensor  # (S, 1, 1, L) bool: keys a query may see (its segment's; padded rows see the first)
    segment: torch.Tensor  # (N,) long: each token's segment
    offset: torch.Tensor  # (N,) long: its slot within the segment

    @classmethod
    def of(cls, cu: torch.Tensor, longest: int, n: int) -> PaddedLayout:
        cu = cu.to(dtype=torch.long)
        starts, sizes = cu[:-1], cu[1:] - cu[:-1]
        offsets = torch.arange(longest, device=cu.device)
        real = offsets[None, :] < sizes[:, None]
        tokens = torch.arange(n, device=cu.device)
        segment = torch.searchsorted(cu[1:], tokens, right=True)
        allowed = (real | (offsets == 0))[:, None, None, :]  # padded rows see one key: no row all masked
        return cls(torch.where(real, starts[:, None] + offsets, 0), real, sizes, allowed, segment,
                   tokens - starts[segment])  # fmt: skip

    @functools.cached_property
    def blocked_bias(self) -> torch.Tensor:
        """(S, 1, 1, L) float32: 0 where `allowed`, -inf elsewhere (an additive mask)."""
        return torch.zeros(self.allowed.shape, device=self.allowed.device).masked_fill_(~self.allowed, float("-inf"))

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """(1, H, N, D) -> (S, H, L, D)."""
        return t[0][:, self.index].transpose(0, 1)

    def scatter(self, out: torch.Tensor) -> torch.Tensor:
        """(S, H, L, D) -> (1, N, H, D)."""
        return out[self.segment, :, self.offset][None]


def _layout(cu: torch.Tensor, bounds: Any, longest: int, n: int) -> PaddedLayout:
    """The padded layout of `cu`, cached on the engine's `bounds` when there are (they outlive the call)."""
    if bounds is None or not hasattr(bounds, "derived"):
        return PaddedLayout.of(cu, longest, n)
    key = ("padded", longest, n)
    if key not in bounds.derived:
        bounds.derived[key] = PaddedLayout.of(cu, longest, n)
    return bounds.derived[key]


def _with_key_bias(mask: torch.Tensor | None, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive float mask: `mask` (bool: True attends; float: additive; None) with the (B, L) key
    `bias` added to every query row."""
    bias = bias[:, None, None, :].to(dtype)  # (B, 1, 1, L)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, float("-inf"))
    return mask + bias


#: Bytes of float32 scores the explicit path holds at once, by device type: segments, then queries,
#: are taken in chunks that fit (a full-attention block of a large image would otherwise hold heads x
#: N x N). On a CPU, chunks that stay in the L2 cache ran a 1024-token block 2.5x faster than 64 MiB
#: ones; on a GPU every chunk is a few launches, so chunks are large.
EXPLICIT_BUDGET_BYTES = {"cpu": 2 * 2**20, "cuda": 256 * 2**20}


def _explicit(
    query,
    key,
    value,
    cu: torch.Tensor,
    lengths: list[int] | None,
    longest: int,
    scaling,
    key_bias=None,
    bounds: Any = None,
):
    """The block's attention as matmul-softmax-matmul over padded segments, and each token's column
    mean of its segment's attention probabilities (heads averaged): (1, N, H, D) and (N,) float32.
    `key_bias` (N,): added to every key's logits (proportional attention), when given.

    The scale is folded into the queries, padded keys are masked by an in-place additive bias, and
    the column means come from one matmul of the probabilities with per-query weights (zero for
    padded rows): the heads x L x L scores are passed over a few times, not once per step. Chunk
    sizes depend on host-known lengths only: no reads."""
    device = query.device
    heads, n = query.shape[1], query.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    equal = lengths is not None and len(set(lengths)) == 1
    if equal:
        segments, length = len(lengths), lengths[0]
        q, k, v = (t[0].view(heads, segments, length, -1).transpose(0, 1) for t in (query, key, value))
        weights = 1.0 / (heads * length)  # every query row is real and weighs the same
        bias = None if key_bias is None else key_bias.float().view(segments, 1, 1, length)
    else:
        layout = _layout(cu, bounds, longest, n)
        segments, length = layout.index.shape
        q, k, v = (layout.gather(t) for t in (query, key, value))  # (S, H, L, D)
        weights = layout.real / (heads * layout.sizes[:, None].clamp(min=1))  # padded query rows count for nothing
        # Padded keys get -inf; each segment's first key stays visible, so no row is all masked.
        bias = (
            layout.blocked_bias
            if key_bias is None
            else torch.where(layout.allowed, key_bias.float()[layout.index][:, None, None, :], float("-inf"))
        )
    q = q.float() * scale  # (S, H, L, D): scaling the queries is cheaper than scaling every score
    k_t = k.float().transpose(-1, -2)

    def attend(s0: int, s1: int, q0: int, q1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Output (s, H, c, D) and column sums (s, L) of segments s0:s1, queries q0:q1."""
        scores = torch.matmul(q[s0:s1, :, q0:q1], k_t[s0:s1])  # (s, H, c, L)
        if bias is not None:
            scores.add_(bias[s0:s1])
        probs = scores.softmax(dim=-1)
        if equal:
            column = probs.sum(dim=(1, 2)).mul_(weights)
        else:
            chunk = s1 - s0
            rows = weights[s0:s1, None, q0:q1].expand(chunk, heads, q1 - q0).reshape(chunk, 1, -1)
            column = torch.bmm(rows, probs.view(chunk, -1, length))[:, 0]
        return torch.matmul(probs.to(v.dtype), v[s0:s1]), column

    budget = EXPLICIT_BUDGET_BYTES.get(device.type, EXPLICIT_BUDGET_BYTES["cuda"])
    row_bytes = heads * length * 4  # one query row of float32 scores, all heads
    per_segment = max(1, budget // (row_bytes * length))
    if per_segment >= segments:  # all at once (attention windows, small images)
        out, column_mean = attend(0, segments, 0, length)
    else:
        per_query = length if per_segment > 1 else max(1, min(length, budget // row_bytes))
        out = torch.empty(segments, heads, length, v.shape[-1], dtype=v.dtype, device=device)
        column_mean = torch.zeros(segments, length, device=device)
        for s0 in range(0, segments, per_segment):
            s1 = min(s0 + per_segment, segments)
            for q0 in range(0, length, per_query):
                q1 = min(q0 + per_query, length)
                out[s0:s1, :, q0:q1], column = attend(s0, s1, q0, q1)
                column_mean[s0:s1] += column
    if equal:
        return out.transpose(0, 1).reshape(heads, n, -1).transpose(0, 1)[None], column_mean.reshape(-1)
    return layout.scatter(out), column_mean[layout.segment, layout.offset]


def _padded(query, key, value, layout: PaddedLayout, scaling, dropout, key_bias=None) -> torch.Tensor:
    """Ragged segments as one padded batch with padded keys masked (reads nothing back); `key_bias`
    (N,), when given, added to every key's logits."""
    q, k, v = (layout.gather(t) for t in (query, key, value))  # (S, H, L, D)
    mask = layout.allowed if key_bias is None else _with_key_bias(layout.allowed, key_bias[layout.index], query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return layout.scatter(out)  # (1, N, H, D)


AttentionInterface.register(PACKED, packed_attention)
AttentionInterface.register(PACKED_VARLEN, packed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED, sdpa_mask)


def is_packed(config: Any) -> bool:
    """Whether `config` is configured with ``illava_packed``."""
    return getattr(config, "_attn_implementation", None) == PACKED


def takes_bounds(config: Any) -> bool:
    """Whether a module with `config` runs the packed kernel now -- configured so, or routed there for
    one block by `run_packed` -- and so takes the block's host-known bounds (``illava_bounds``)."""
    return getattr(config, "_attn_implementation", None) in (PACKED, PACKED_VARLEN, PACKED_CAPTURE)


@contextmanager
def run_packed(module: torch.nn.Module, route: Route | None = None) -> Iterator[None]:
    """Route `module` (a vision attention) to the packed kernel for one block call: it then hands the
    kernel the whole block at once. With a `route`, the kernel also gets its bounds and key bias
    (the engine routes a block of any configured implementation so, for proportional attention)."""
    original = module.config
    routed = copy.copy(original)
    routed._attn_implementation_internal = (
        PACKED_VARLEN  # the field itself: the setter recurses into shared sub-configs
    )
    module.config = routed
    if route is not None:
        module.__dict__[ROUTE] = route
    try:
        yield
    finally:
        module.config = original
        module.__dict__.pop(ROUTE, None)
