"""The contract between the engine and a backbone family.

A `BackboneAdapter` tells the engine everything that depends on one model family and nothing
else; the engine (`illava.engine`) owns the rest -- plans, capture of queries and keys, calling
the reduction method, applying its maps, re-packing the LLM sequence, per-layer caches, masks and
decoding. It is written in the style of Optuna's storage base classes: what an adapter must
provide, what it may assume, and what it must never do.

An adapter MUST provide (abstract methods below, grouped):

* **identity** -- ``family`` (a short name), ``model_types`` (``config.model_type`` values it
  loads), `classes` (the outer and inner model classes it patches), `inner_model`;
* **structure** -- `depths` (encoder blocks, decoder layers), `vision_tower`, `language_model`,
  the blocks and whether each attends within windows, the attention modules the engine captures,
  `attention_scale`;
* **encoder** -- `visual_call` (pixel inputs and host-side item layouts from the model's inputs),
  `vision_prepare` (tokens in processing order, segments contiguous, units, placement order,
  per-token tables), one block whole (`vision_block`) or in two halves around a merge
  (`vision_attention_half`, `vision_ffn_half`), `vision_project` (projector on the surviving
  units) and `vision_place` (their placement among the item's LLM tokens);
* **LLM** -- `prefill_positions` (the positions the library would use on the *unmerged* prompt),
  `rotary`, `decode_positions`, ``position_rows``, token ids of the placeholders;
* **inputs, loading, cost** -- `build_inputs` (the family's prompt layout and processor, without
  torchvision), `chat_turn`, ``end_of_turn``, `load` (a local checkpoint through the Auto classes,
  ``local_files_only``), `size_multiple`, `flops`.

To run the ``downsample`` method (`illava.methods.downsample`) it also provides `downsample_size`
(the size an image is resized to before the processor, by the family's grid), `downsample_grids`
(the same rule on its FLOPs description) and, where the default per-image resize does not fit the
family, `downsample_sample`; without them a downsample schedule fails naming the family.

It MAY assume: the engine calls `vision_prepare` once per encoder call and then the block
methods in order, each with the inner multimodal model; a merging block's attention half runs with its attention module's queries and
keys captured; `vision_place` receives features for exactly the units `VisionRun.order` lists;
`prefill_positions` is called once per prefill with the bound forward arguments.

It MUST NEVER: merge, select or score tokens itself (that is the reduction method's job), keep
state on the adapter (it is shared by every model of the family), read device values back to the
host beyond what the library's own forward reads, or change the library's numerics for a
schedule that removes nothing (the contract tests hold zero reduction to the unpatched model).
"""

from __future__ import annotations

import dataclasses
import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..engine.model import SUPPORTED_ATTENTION
from ..engine.vision import Bounds, EncodedVisual, VisionRun, VisualCall
from ..inputs import resized

__all__ = ["SUPPORTED_ATTENTION", "Backbone", "BackboneAdapter"]

if TYPE_CHECKING:
    from ..flops import CostModules, Flops
    from ..inputs import Sample
    from ..schedule import Schedule


@dataclass
class Backbone:
    """A model with the tokenizer and image processor that belong to it, and its family's adapter
    (``illava.adapter_for(model)`` finds it for a model; a model-less backbone, for building inputs
    only, names it)."""

    model: Any
    tokenizer: Any
    image_processor: Any
    name: str
    adapter: BackboneAdapter

    @property
    def config(self) -> Any:
        return self.model.config


class BackboneAdapter(ABC):
    """One model family. Instances are stateless and registered with `register_adapter`."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    #: Rows of the LLM's position ids: 3 for mRoPE, 1 for 1-D RoPE.
    position_rows: ClassVar[int] = 3
    #: The turn end the family's chat template writes after an answer.
    end_of_turn: ClassVar[str] = "<|im_end|>"
    #: Per-token features that ride along the LLM sequence and merge like hidden states; empty for
    #: most families (their shapes: `llm_extra_shapes`).
    llm_extras: ClassVar[tuple[str, ...]] = ()
    #: Whether videos can merge before the LLM (False: the family transforms frames after its
    #: encoder in a way kept tokens cannot follow; only LLM merges apply to videos).
    encoder_merges_video: ClassVar[bool] = True
    #: Whether the vision tower runs one packed sequence (batch 1, segments by cu_seqlens), so what
    #: its attention calls yield is per token in run order (else: a batch the adapter un-pads).
    packed_sequence: ClassVar[bool] = True

    # ------------------------------------------------------------------ identity
    @abstractmethod
    def classes(self) -> tuple[type, ...]:
        """Model classes this adapter patches (outer generation class first, then the inner model)."""

    @abstractmethod
    def inner_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The inner multimodal model (vision tower + LLM) of `model`, or None if not this family."""

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(cls.__name__ for cls in self.classes())

    # ------------------------------------------------------------------ structure
    @abstractmethod
    def depths(self, config: Any) -> tuple[int, int]:
        """(vision encoder blocks that may merge, LLM decoder layers) of a model's config."""

    @abstractmethod
    def vision_tower(self, inner: torch.nn.Module) -> torch.nn.Module: ...

    @abstractmethod
    def language_model(self, inner: torch.nn.Module) -> torch.nn.Module:
        """The decoder stack: ``.layers``, ``.norm``, ``.rotary_emb``, ``.embed_tokens``, ``.config``."""

    def attention_configs(self, inner: torch.nn.Module) -> dict[str, Any]:
        """Configs whose attention implementation the engine must support, by part name."""
        return {"vision encoder": self.vision_tower(inner).config, "language model": self.language_model(inner).config}

    def text_config(self, config: Any) -> Any:
        return config.text_config

    @abstractmethod
    def vision_blocks(self, inner: torch.nn.Module) -> Sequence[torch.nn.Module]: ...

    def vision_block_windowed(self, inner: torch.nn.Module, index: int) -> bool:
        """Whether block `index` attends within windows (else within whole segments)."""
        return False

    @abstractmethod
    def vision_attention(self, block: torch.nn.Module) -> torch.nn.Module:
        """The attention module of a vision block (captured in merging blocks)."""

    def decoder_attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.self_attn

    def attention_scale(self, attention: torch.nn.Module) -> float:
        """The softmax scale of an attention module (transformers names it ``scaling``; CLIP-style ``scale``)."""
        scale = getattr(attention, "scaling", None)
        return attention.scale if scale is None else scale

    def vision_queries_keys(self, captured, run: VisionRun) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, N, D) queries and keys of a merging block from what its attention call captured (the
        packed towers pass one sequence: batch row 0)."""
        return captured.query[0], captured.key[0]

    # ------------------------------------------------------------------ encoder
    @abstractmethod
    def visual_call(self, inner: torch.nn.Module, modality: str, arguments: dict[str, Any]) -> VisualCall | None:
        """The encoder call for `modality` from the bound arguments of the model's forward or of its
        ``get_<modality>_features`` (None when there are no such pixels)."""

    @abstractmethod
    def vision_prepare(self, inner: torch.nn.Module, call: VisualCall) -> VisionRun: ...

    @abstractmethod
    def vision_block(
        self, inner: torch.nn.Module, block: torch.nn.Module, run: VisionRun, bounds: Bounds
    ) -> torch.Tensor:
        """One block, unmerged, on ``run.hidden``; returns the new hidden states."""

    @abstractmethod
    def vision_attention_half(
        self, inner: torch.nn.Module, block: torch.nn.Module, run: VisionRun, bounds: Bounds
    ) -> torch.Tensor:
        """hidden + attention(norm(hidden)): the block up to where the merge goes."""

    @abstractmethod
    def vision_ffn_half(self, inner: torch.nn.Module, block: torch.nn.Module, run: VisionRun) -> torch.Tensor:
        """hidden + mlp(norm(hidden)): the rest of the block, on the merged ``run.hidden``."""

    def after_vision_block(self, inner: torch.nn.Module, index: int, run: VisionRun) -> None:
        """Record taps (DeepStack, selected feature layers) after block `index`; default none."""
        return None

    @abstractmethod
    def vision_project(self, inner: torch.nn.Module, run: VisionRun) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(features (U, C_out) of the surviving units in run order, extras (U, ...) by name)."""

    @abstractmethod
    def vision_place(
        self,
        inner: torch.nn.Module,
        call: VisualCall,
        run: VisionRun,
        features: torch.Tensor,
        extras: dict[str, torch.Tensor],
    ) -> EncodedVisual:
        """Per item: the kept features in placement order and which placeholders they fill."""

    # ------------------------------------------------------------------ LLM
    @abstractmethod
    def placeholder_token_id(self, config: Any, modality: str) -> int: ...

    @abstractmethod
    def prefill_positions(
        self, inner: torch.nn.Module, arguments: dict[str, Any], embeds: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """(position_rows, B, L) positions of the unmerged prompt, exactly as the library computes them."""

    @abstractmethod
    def rotary(self, lm: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor):
        """(cos, sin), each (B, L, D), for (position_rows, B, L) positions."""

    def decode_positions(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """`generate`'s position ids for new tokens, as (position_rows, B, q)."""
        positions = position_ids[1:] if position_ids.dim() == 3 and position_ids.shape[0] == 4 else position_ids
        if positions.dim() == 3:
            return positions.expand(self.position_rows, batch, -1)
        return positions[None].expand(self.position_rows, -1, -1)

    def llm_extra_shapes(self, config: Any) -> dict[str, tuple[int, ...]]:
        """Trailing shapes of the `llm_extras` (allocated per prompt token, zero on text)."""
        return {}

    def after_decoder_layer(
        self, inner: torch.nn.Module, index: int, hidden: torch.Tensor, extras: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """What the family adds to the residual stream after decoder layer `index` (DeepStack)."""
        return hidden

    def reset(self, inner: torch.nn.Module) -> None:
        """Forget per-generation state on apply/remove (cached rope deltas)."""
        return None

    def output(self, inner: torch.nn.Module, hidden: torch.Tensor, cache: Any):
        """The inner model's output object for the merged prefill or a decoding step."""
        from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast

        return MultimodalBaseModelOutputWithPast(last_hidden_state=hidden, cache=cache)

    # ------------------------------------------------------------------ inputs, loading, cost
    @abstractmethod
    def build_inputs(self, backbone: Backbone, samples: list[Sample], *, chat: bool = True, video_fps: float = 2.0):
        """Everything the model's ``forward``/``generate`` needs for `samples`, left padded."""

    @abstractmethod
    def chat_turn(self, text: str) -> str:
        """One user turn in the family's chat layout, ending where the assistant's answer starts."""

    # ------------------------------------------------------------------ downsampled inputs (`downsample`)
    def downsample_size(
        self, config: Any, image_processor: Any, size: tuple[int, int], schedule: Schedule, *, alone: bool = True
    ) -> tuple[int, int]:
        """The (width, height) to resize an image of (width, height) `size` to before the family's
        processor, so that it yields about the tokens the downsample `schedule` keeps of it
        (`illava.methods.downsample` states the rules); `size` itself where nothing changes. `alone`:
        the image is the only one of its prompt (False: one of several, or a video frame)."""
        raise NotImplementedError(f"the {self.family} adapter does not build downsampled inputs")

    def downsample_sample(self, config: Any, image_processor: Any, sample: Sample, schedule: Schedule) -> Sample:
        """`sample` with every image and video frame resized as `downsample_size` says (the text, and
        the samples given, unchanged)."""
        alone = len(sample.images) == 1

        def size_of(image, alone: bool) -> tuple[int, int]:
            return self.downsample_size(config, image_processor, image.size, schedule, alone=alone)

        images = [resized(image, size_of(image, alone), image_processor) for image in sample.images]
        videos = []
        for video in sample.videos:  # every frame of a video has the same size (the processor checks it)
            size = size_of(video[0], False)
            videos.append([resized(frame, size, image_processor) for frame in video])
        return dataclasses.replace(sample, images=images, videos=videos)

    def downsample_grids(self, config: Any, schedule: Schedule, grids: Sequence[Any]) -> list:
        """`grids` -- the `flops` description of full-resolution inputs, as `flop_inputs` reads it off
        a batch -- as the downsample `schedule` makes them: what `illava.prefill_flops` counts the
        unmerged model on (the same rule as `downsample_size`, from the config alone)."""
        raise NotImplementedError(f"the {self.family} adapter has no FLOPs model of downsampled inputs")

    def load(self, path: Path, *, attn_implementation: str, dtype: torch.dtype) -> Backbone:
        """A local checkpoint directory of this family (config, weights, tokenizer, processor),
        through transformers' Auto classes with ``local_files_only``, checked to be of this family."""
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        model = AutoModelForImageTextToText.from_pretrained(
            path, attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
        ).eval()
        if self.inner_model(model) is None:
            raise ValueError(
                f"backbone {str(path)!r} loaded as {type(model).__name__}, which the {self.family} adapter does "
                f"not patch (it patches {', '.join(self.class_names)})"
            )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        tokenizer.padding_side = "left"
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        return Backbone(model, tokenizer, image_processor, str(path), self)

    @abstractmethod
    def size_multiple(self, config: Any) -> int:
        """Image sides (pixels) that are multiples of this pass the processor unchanged."""

    @abstractmethod
    def flops(self, config: Any, schedule: Schedule, grids: Any, text_tokens: int) -> Flops:
        """Prefill FLOPs of encoding `grids` (the family's size description) under `schedule`."""

    @abstractmethod
    def flop_inputs(self, config: Any, inputs: Any) -> tuple[list, int]:
        """(the `flops` description of a `build_inputs` batch's visual inputs, its other prompt tokens)."""

    def image_tokens(self, inner: torch.nn.Module, inputs: Any) -> list[int]:
        """Per sample, the image-content tokens of a batch's prompt (what plans count: placeholders
        less structural ones such as newlines), from the host-side layouts."""
        ids = inputs["input_ids"]
        counts = [0] * ids.shape[0]
        for modality in ("image", "video"):
            call = self.visual_call(inner, modality, dict(inputs))
            if call is None:
                continue
            per_row = (ids == self.placeholder_token_id(inner.config, modality)).sum(dim=1).tolist()
            layouts = iter(call.items)
            for row, placeholders in enumerate(per_row):
                while placeholders > 0:
                    layout = next(layouts)
                    counts[row] += sum(layout.segment_sizes)
                    placeholders -= layout.placeholders
        return counts

    def text_tokens(self, config: Any, inputs: Any) -> int:
        """Prompt tokens of a batch that are not image or video placeholders."""
        ids = (
            inputs["input_ids"][inputs["attention_mask"].bool()] if "attention_mask" in inputs else inputs["input_ids"]
        )
        placeholders = torch.tensor([self.placeholder_token_id(config, modality) for modality in ("image", "video")])
        return int((~torch.isin(ids, placeholders.to(ids.device))).sum())

    @abstractmethod
    def cost_modules(self, model: torch.nn.Module) -> CostModules:
        """The modules whose shapes set the per-token costs (`illava.flops.module_costs` builds the
        model on the meta device and reads them)."""

    # ------------------------------------------------------------------ built-ins
    #: Special tokens the family's built-in tokenizer needs beyond the Qwen ones.
    extra_special_tokens: ClassVar[tuple[str, ...]] = ()

    def builtins(self) -> dict[str, Any]:
        """Built-in backbones of this family: name -> size spec (with a ``description``)."""
        return {}

    def build_config(self, spec: Any, token_ids: dict[str, int], vocab_size: int) -> Any:
        """The config of a built-in from its spec and the built-in tokenizer's ids."""
        raise NotImplementedError(f"{self.family} has no built-ins")

    def builtin_image_processor(self, spec: Any) -> Any:
        raise NotImplementedError(f"{self.family} has no built-ins")

    def vision_timing_modules(self, inner: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(first module of the encoder, its projector): the profiler times the encoder from the
        first's forward pre-hook to the second's, and the projector until its forward hook."""
        raise NotImplementedError(f"{self.family}: no encoder timing hooks")

    def encode_images(self, inner: torch.nn.Module, inputs: Any):
        """The inner model's own image encoder (``get_image_features``) on a `build_inputs` batch."""
        function = inner.get_image_features
        names = inspect.signature(function).parameters
        return function(**{key: value for key, value in inputs.items() if key in names})

    # ------------------------------------------------------------------ helpers for subclasses
    @staticmethod
    def bind(function, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Bound arguments of `function` (its signature, defaults applied), ``**kwargs`` flattened in."""
        bound = inspect.signature(function).bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        for name, parameter in inspect.signature(function).parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}) or {})
        return arguments
