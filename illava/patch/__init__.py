"""Per-backbone glue. Each module exposes `inner_model`, `apply`, `remove` and `state_of`."""

from . import qwen2_5_vl

#: Patch modules in the order `illava.apply` tries them.
PATCHES = (qwen2_5_vl,)

#: Model classes `illava.apply` accepts, for error messages.
SUPPORTED_MODELS = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
