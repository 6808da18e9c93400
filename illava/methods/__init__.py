"""Reduction methods, registered by name (the way transformers registers attention functions).

A method is a `ReductionMethod` value with named stage calls (see `base` for the contract). The
built-ins are ``illava`` (the paper), ``prune`` (its selection without recycling), ``random``
(seeded random dropping), and peers: ``fastv`` and ``pdrop`` (text-guided pruning in the LLM),
``divprune`` (a diverse subset before the LLM), ``visionzip`` (the encoder's most attended tokens
plus merged contextual ones, before the LLM) and ``sparsevlm`` (question-rated pruning with
recycling in the LLM); ``illava`` with ``text_guided=True`` scores LLM tokens by the question
instead; and ``downsample``, the unmerged model on a lower input resolution with the same token
budget (VTC-Bench's baseline; the inputs change, not the model); ``tome`` is ToMe's bipartite
matching inside encoder blocks (size-weighted merges, proportional attention). Adding one is a
module with a `ReductionMethod` subclass and a `register_method` call; schedules then name it and
validate its parameters.
"""

from __future__ import annotations

from ..errors import ScheduleError
from .base import STAGES, MethodParams, PromptView, ReductionMethod, SegmentSpec, StageRequest
from .divprune import DivPrune
from .downsample import Downsample, DownsampleWarning
from .fastv import FastV, PyramidDrop
from .illava import Illava, IllavaParams
from .prune import Prune
from .random_drop import RandomDrop, RandomParams
from .sparsevlm import SparseVLM, SparseVLMParams
from .tome import ToMe, ToMeParams
from .visionzip import VisionZip, VisionZipParams

_METHODS: dict[str, ReductionMethod] = {}


def register_method(method: ReductionMethod, *, replace: bool = False) -> ReductionMethod:
    """Make `method` available under `method.name`; a second registration of a name needs `replace`."""
    if not isinstance(method, ReductionMethod):
        raise TypeError(f"register_method takes a ReductionMethod instance, got {type(method).__name__}")
    if method.encoder_stage not in ("blocks", "between"):
        raise ValueError(f"{method.name}: encoder_stage must be 'blocks' or 'between', got {method.encoder_stage!r}")
    if method.name in _METHODS and not replace:
        raise ValueError(f"a reduction method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def get_method(name: str) -> ReductionMethod:
    """The registered method `name`; a `ScheduleError` naming the registered ones otherwise."""
    method = _METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ScheduleError(f"unknown method {name!r}; allowed: {', '.join(method_names())}")
    return method


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


for _builtin in (Illava(), Prune(), RandomDrop(), FastV(), PyramidDrop(), DivPrune(), VisionZip(), SparseVLM(),
                 Downsample(), ToMe()):  # fmt: skip
    register_method(_builtin)

__all__ = [
    "STAGES",
    "DivPrune",
    "Downsample",
    "DownsampleWarning",
    "FastV",
    "Illava",
    "IllavaParams",
    "MethodParams",
    "PromptView",
    "Prune",
    "PyramidDrop",
    "RandomDrop",
    "RandomParams",
    "SparseVLM",
    "SparseVLMParams",
    "VisionZip",
    "VisionZipParams",
    "ReductionMethod",
    "SegmentSpec",
    "StageRequest",
    "ToMe",
    "ToMeParams",
    "get_method",
    "method_names",
    "register_method",
    "unregister_method",
]
