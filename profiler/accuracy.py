"""Multiple-choice accuracy without timing: which option a model picks, for many items at once.

The profiler measures accuracy inside `Profiler.measure`, next to latency and memory. Training (to
watch validation accuracy) and the accuracy benchmark need only the answers, many times over, so this
module scores a list of items in batches. Two ways to read a model's choice, by how the model answers:

- ``letter`` (instruction-tuned models, the default): one prefill per item; the answer is the option
  letter with the highest next-token logit at the answer position. This is the profiler's default
  ``score="logits"``, and both give the same choices for the same model and items.
- ``text`` (models that answer with the option's words, such as the `demo` backbone): the prompt asks
  for the option's text, and the choice is the option whose text, followed by the end-of-turn token,
  has the highest log-likelihood after the prompt (the way lm-evaluation-harness scores multiple
  choice for base models). One sequence per option, all in one batched forward. The profiler's
  ``score="options"``.

A model says which it is in its config: ``mcq_answer = "text"`` (saved in config.json) for option
text; anything else answers with letters (`answer_style`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch
from transformers import BatchFeature

from illava import Schedule
from illava.backbones import Backbone
from illava.inputs import build_inputs

from .items import ANSWER_STYLES, MCQItem


def end_of_turn(backbone: Backbone) -> str:
    """The token the backbone's chat template writes after an answer (its family's)."""
    return backbone.adapter.end_of_turn


def answer_style(model) -> str:
    """``text`` when the model's config says it answers with the option's text, else ``letter``."""
    return "text" if getattr(model.config, "mcq_answer", None) == "text" else "letter"


def with_answers(
    inputs: BatchFeature, answers: Sequence[Sequence[int]], pad_id: int
) -> tuple[BatchFeature, torch.Tensor]:
    """`inputs` (left padded prompts) with each row's answer tokens appended, left padded again, and
    the labels of the last K positions: (B, K), row i's answer in its last len(answer_i) columns,
    -100 elsewhere (K is the longest answer). The logits that predict them are
    ``model(..., logits_to_keep=K + 1).logits[:, :K]``."""
    if len(answers) != inputs["input_ids"].shape[0]:
        raise ValueError(f"{len(answers)} answers for {inputs['input_ids'].shape[0]} prompts")
    mask = inputs["attention_mask"].bool()
    rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "mm_token_type_ids": []}
    for i, answer in enumerate(answers):
        ids = inputs["input_ids"][i][mask[i]].tolist() + list(answer)
        rows["input_ids"].append(ids)
        rows["mm_token_type_ids"].append(inputs["mm_token_type_ids"][i][mask[i]].tolist() + [0] * len(answer))
        rows["attention_mask"].append([1] * len(ids))
    length = max(len(row) for row in rows["input_ids"])
    pad = {"input_ids": pad_id, "attention_mask": 0, "mm_token_type_ids": 0}
    out = BatchFeature(dict(inputs))
    for key, values in rows.items():
        out[key] = torch.tensor([[pad[key]] * (length - len(row)) + row for row in values])  # (B, L)
    width = max(len(answer) for answer in answers)
    labels = torch.tensor([[-100] * (width - len(answer)) + list(answer) for answer in answers])  # (B, K)
    return out, labels


def answer_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probability of each row's labelled tokens; logits (B, K, V), labels (B, K)."""
    logp = logits.float().log_softmax(dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, K)
    return picked.masked_fill(labels < 0, 0.0).sum(dim=-1)


def option_inputs(
    backbone: Backbone, items: Sequence[MCQItem], *, schedule: Schedule | None = None
) -> tuple[BatchFeature, torch.Tensor, list[int]]:
    """One sequence per (item, option): the ``text`` prompt followed by the option's text and the
    end-of-turn token; returns the inputs, the labels (see `with_answers`) and each item's option count.
    `schedule`: as `build_inputs` takes it (a downsample schedule resizes the images)."""
    tokenizer = backbone.tokenizer
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn(backbone))
    samples, answers, counts = [], [], []
    for item in items:
        sample = item.to_sample("text")
        for text in item.options.values():
            samples.append(sample)
            answers.append([*tokenizer.encode(text, add_special_tokens=False), end_id])
        counts.append(len(item.options))
    inputs = build_inputs(backbone, samples, schedule=schedule)
    inputs, labels = with_answers(inputs, answers, tokenizer.pad_token_id)
    return inputs, labels, counts


def choose_by_text(
    backbone: Backbone, items: Sequence[MCQItem], device: torch.device | str, *, schedule: Schedule | None = None
) -> list[str]:
    """The letter of each item's option whose text is most likely after the ``text`` prompt: every
    (item, option) sequence in one forward (see `option_inputs`; `schedule` as it takes it)."""
    inputs, labels, counts = option_inputs(backbone, items, schedule=schedule)
    width = labels.shape[1]
    logits = backbone.model(**inputs.to(device), logits_to_keep=width + 1, use_cache=False).logits[:, :width]
    return pick_options(answer_logprob(logits, labels.to(device)).cpu(), items, counts)


def pick_options(scores: torch.Tensor, items: Sequence[MCQItem], counts: Sequence[int]) -> list[str]:
    """The letter of each item's best-scoring option; `scores` holds the items' options in order."""
    choices, start = [], 0
    for item, count in zip(items, counts, strict=True):
        choices.append(list(item.options)[int(torch.argmax(scores[start : start + count]))])
        start += count
    return choices


def letter_ids(tokenizer) -> dict[str, int]:
    """Token id of each option letter as the first token of an answer ("A", not " A": the chat
    template ends with a newline). A letter that is not one token is an error: logits scoring
    needs a single token per option."""
    ids = {}
    for letter in "ABCDEFGH":
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) == 1:
            ids[letter] = encoded[0]
    if not {"A", "B", "C", "D"} <= set(ids):
        raise ValueError("this tokenizer does not encode option letters A-D as single tokens; use score='generate'")
    return ids


@torch.inference_mode()
def choose(
    backbone: Backbone,
    items: Sequence[MCQItem],
    *,
    batch_size: int = 16,
    progress: Callable[[Iterable], Iterable] | None = None,
    answer: str | None = None,
    schedule: Schedule | None = None,
) -> list[str]:
    """The option letter the model ranks highest for each item, in order. `answer`: ``letter`` or
    ``text`` (see the module docstring); None reads it from the model's config (`answer_style`).
    `batch_size` counts items (a ``text`` batch holds one sequence per option). `schedule`: the
    inputs are built for it (a downsample schedule resizes the images; the model is used as it is)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = backbone.model
    answer = answer or answer_style(model)
    if answer not in ANSWER_STYLES:
        raise ValueError(f"answer must be one of {', '.join(ANSWER_STYLES)}, got {answer!r}")
    device = next(model.parameters()).device
    letters = letter_ids(backbone.tokenizer) if answer == "letter" else {}
    starts = range(0, len(items), batch_size)
    choices: list[str] = []
    for start in progress(starts) if progress else starts:
        chunk = items[start : start + batch_size]
        if answer == "text":
            choices += choose_by_text(backbone, chunk, device, schedule=schedule)
            continue
        inputs = build_inputs(backbone, [item.to_sample() for item in chunk], schedule=schedule)
        logits = model(**inputs.to(device), logits_to_keep=1, use_cache=False).logits[:, -1].float()  # (B, V)
        for row, item in enumerate(chunk):
            options = list(item.options)
            choices.append(options[int(torch.argmax(logits[row, [letters[o] for o in options]]))])
    return choices


def accuracy_by_category(items: Sequence[MCQItem], choices: Sequence[str]) -> dict[str, float]:
    """Share of right answers per item category (``None`` becomes "other"), plus ``all``."""
    if len(items) != len(choices):
        raise ValueError(f"{len(items)} items but {len(choices)} choices")
    right: dict[str, list[bool]] = defaultdict(list)
    for item, choice in zip(items, choices, strict=True):
        right[item.category or "other"].append(choice == item.answer)
        right["all"].append(choice == item.answer)
    return {category: sum(hits) / len(hits) for category, hits in right.items()}


__all__ = [
    "accuracy_by_category",
    "answer_logprob",
    "answer_style",
    "choose",
    "choose_by_text",
    "end_of_turn",
    "letter_ids",
    "option_inputs",
    "pick_options",
    "with_answers",
]
