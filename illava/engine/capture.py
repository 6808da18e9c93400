"""Queries and keys of one attention call, taken from the call itself.

Importance needs the post-rotary queries and keys a block or decoder layer uses. Rather than
re-project them (a second q/k projection) or copy the library's attention forwards per family,
the engine runs the library's own module and captures what it hands its attention kernel.

How: transformers looks attention kernels up by name (`ALL_ATTENTION_FUNCTIONS`, keyed by the
config's ``_attn_implementation``). `capture(module)` gives that one attention module, for the
duration of one call, a shallow copy of its config whose implementation is a name registered here
(`AttentionInterface.register`); the registered function records the query and key, then calls
the module's real kernel with the original config restored (flash kernels read the
implementation name off ``module.config``). The capture name contains "flash" exactly when the
real one does, so the module takes the same path (one varlen call for flash, one call per window
otherwise) as without capture; per-window calls are concatenated back. Nothing else changes:
other modules, other calls, and the outputs are those of the real kernel.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import PACKED, PACKED_CAPTURE, PACKED_VARLEN

CAPTURE = "illava_capture"
CAPTURE_FLASH = "illava_capture_flash"


@dataclass
class Captured:
    """What the captured calls saw; per-window calls are concatenated along the sequence."""

    implementation: str
    original_config: object
    capture_config: object
    eager: object  # the module's own eager kernel (transformers passes it as the default)
    queries: list[torch.Tensor] = field(default_factory=list)  # (B, H, n, D) per call
    keys: list[torch.Tensor] = field(default_factory=list)  # (B, Hk, n, D)
    weights: list[torch.Tensor | None] = field(default_factory=list)  # eager: (B, H, n, n) probabilities
    importance_parts: list[torch.Tensor] = field(default_factory=list)  # per call: (n,) column means, when known
    wants_importance: bool = True  # whether the packed kernel should compute the column means with the attention

    @property
    def query(self) -> torch.Tensor:
        """(B, H, N, D): the calls' queries along the sequence."""
        return self.queries[0] if len(self.queries) == 1 else torch.cat(self.queries, dim=2)

    @property
    def key(self) -> torch.Tensor:
        return self.keys[0] if len(self.keys) == 1 else torch.cat(self.keys, dim=2)

    @property
    def importance(self) -> torch.Tensor | None:
        """(N,) column mean of each call's attention probabilities (heads averaged) for a packed
        sequence (batch 1) whose every call yielded them -- the packed kernel's, or eager's
        probabilities of one window or frame per call -- else None (then it is recomputed)."""
        if not self.importance_parts or len(self.importance_parts) != len(self.queries):
            return None
        parts = self.importance_parts
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _capturing_attention(module, query, key, value, attention_mask, *args, **kwargs):
    slot: Captured = module.__dict__["_illava_capture"]
    module.config = slot.original_config
    if slot.implementation == PACKED_VARLEN and query.shape[0] == 1 and slot.wants_importance:
        kwargs["illava_importance"] = slot.importance_parts  # the packed kernel computes it with the attention
    try:
        kernel = ALL_ATTENTION_FUNCTIONS.get_interface(slot.implementation, slot.eager)
        out, weights = kernel(module, query, key, value, attention_mask, *args, **kwargs)
    finally:
        module.config = slot.capture_config
    slot.queries.append(query)
    slot.keys.append(key)
    slot.weights.append(weights)
    if weights is not None and weights.dim() == 4 and weights.shape[0] == 1 and attention_mask is None:
        # eager, one unmasked sequence per call (a window or a frame): its probabilities are the importance
        slot.importance_parts.append(weights.float().sum(dim=(0, 1, 2)) / (weights.shape[1] * weights.shape[2]))
    return out, weights


AttentionInterface.register(CAPTURE, _capturing_attention)
AttentionInterface.register(CAPTURE_FLASH, _capturing_attention)
AttentionInterface.register(PACKED_CAPTURE, _capturing_attention)


def _eager_kernel(module: torch.nn.Module):
    """The eager kernel of the module's own modeling file (what it passes transformers as the default)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


@contextmanager
def capture(module: torch.nn.Module, *, enabled: bool = True, importance: bool = True) -> Iterator[Captured | None]:
    """Capture the queries and keys `module` (an attention module with a ``config``) passes to its
    kernel while the block runs. Yields None (and changes nothing) when not `enabled`. Without
    `importance` the packed kernel runs its fast path instead of computing the column means too
    (for a method that needs the keys only)."""
    if not enabled:
        yield None
        return
    original = module.config
    implementation = original._attn_implementation or "eager"
    if implementation == PACKED:  # the packed kernel takes the whole block: route as it would be routed
        implementation = PACKED_VARLEN
    capture_config = copy.copy(original)
    # Set the field itself: the property setter would recurse into sub-configs shared with the original.
    if implementation == PACKED_VARLEN:
        name = PACKED_CAPTURE  # the module hands it the block's bounds, as it would the packed kernel
    else:
        name = CAPTURE_FLASH if "flash" in implementation else CAPTURE
    capture_config._attn_implementation_internal = name
    slot = Captured(implementation, original, capture_config, _eager_kernel(module), wants_importance=importance)
    module.__dict__["_illava_capture"] = slot
    module.config = capture_config
    try:
        yield slot
    finally:
        module.config = original
        del module.__dict__["_illava_capture"]
