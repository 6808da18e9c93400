"""Which skill the `demo` backbone has learned: the figures behind "Status of the demo backbone".

    python benchmarks/demo_skills.py state OUT/train_state.pt   # OUT: an illava-tune train-demo --out folder
    python benchmarks/demo_skills.py pointer --lr 1e-3 --steps 400 [--rope-theta 10000] [--heads 8] [--task copy|compose] [--two-option-steps 300] [--after-match 400]

``state`` loads a training state written by `illava-tune train-demo` and reports, for each way a
training question is asked (list / match / open / choice), how often the first answer token is
right on 192 training-stream questions the run has not reached (steps 100000-100002).

``pointer`` trains a fresh `demo` model on the text-only matching task alone ("Which option says
purple?" with the benchmark's option layout; answer: the letter), and prints the accuracy over each
50 steps: can this LLM learn to point at an option at all, and how fast. ``--task copy`` ("The answer
is B.") is the control: the same loop on a task that needs no pointing. ``--task compose`` is the
benchmark's question with the scene written out instead of drawn ("In the image: purple cross,
orange circle."; no position questions): finding the answer and pointing at its option, without
seeing. ``--after-match N`` runs train-demo's matching curriculum for N steps first.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from illava.backbones import (  # noqa: E402
    DEMO_SPEC,
    Qwen2_5_VLForConditionalGeneration,
    _mrope_section,
    build_config,
    build_untrained,
)
from illava.inputs import Sample, build_inputs  # noqa: E402
from illava_tune.train_demo import (  # noqa: E402
    TrainConfig,
    _batch,
    _probe_loss_and_hits,
    _probe_sizes,
    _two_options,
)
from profiler.datasets import MCQItem  # noqa: E402
from profiler.demo_vqa import CATEGORIES, demo_item, demo_scene  # noqa: E402
from profiler.measure import _letter_ids  # noqa: E402


@torch.no_grad()
def skills(state_path: Path, batch_size: int = 64, first_step: int = 100000, batches: int = 3) -> None:
    backbone = build_untrained("demo")
    state = torch.load(state_path, weights_only=True, map_location="cpu")
    backbone.model.load_state_dict(state["model"])
    model = backbone.model.eval()
    tokenizer = backbone.tokenizer
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = TrainConfig(**{**state["config"], "batch_size": batch_size})
    probe = torch.nn.Linear(DEMO_SPEC.text_hidden, sum(_probe_sizes(config.image_size)))
    probe.load_state_dict(state["probe"])
    captured: list = []
    model.model.visual.register_forward_hook(lambda module, args, output: captured.append(output))
    right: dict[str, list[int]] = {}
    for step in range(first_step, first_step + batches):
        inputs, labels, kinds, token_labels = _batch(backbone, config, step, _letter_ids(tokenizer), end_id)
        width = labels.shape[1]
        predicted = model(**inputs, logits_to_keep=width + 1, use_cache=False).logits[:, :width].argmax(-1)
        features = captured.pop().pooler_output
        named = probe(torch.cat(features) if isinstance(features, list | tuple) else features)
        for target, hits in _probe_loss_and_hits(named, token_labels, config.image_size)[1].items():
            right.setdefault(f"probe {target}", []).extend(hits.tolist())
        for row, form in enumerate(kinds):
            category = CATEGORIES[(step * batch_size + row) % len(CATEGORIES)]  # as demo_scene assigns it
            first = int((labels[row] != -100).nonzero()[0])
            hit = int(predicted[row, first] == labels[row, first])
            right.setdefault(form, []).append(hit)
            if form in ("open", "choice"):
                right.setdefault(f"{form} {category}", []).append(hit)
    print(f"training state at step {state['step']}: first answer token right (probe: image tokens on an object)")
    for form, hits in sorted(right.items()):
        print(f"  {form:<12} {sum(hits):>4}/{len(hits)} = {sum(hits) / len(hits):.1%}")


def _described(index: int) -> MCQItem:
    """A benchmark question with the scene written out instead of drawn ("In the image: blue square,
    red circle."; objects in a seeded order, so the text order says nothing about where they are).
    Position questions are left out: names say nothing about where objects are."""
    index = 5 * (index // 4) + (0, 1, 2, 4)[index % 4]  # skips every position question (index % 5 == 3)
    scene = demo_scene("train", index)  # the scene's fields: nothing is drawn
    names = [o.name for o in scene.objects]
    random.Random(index).shuffle(names)
    hint = f"In the image: {', '.join(names)}."
    return MCQItem(f"train-{index}", scene.question, scene.options, scene.answer, (), scene.category, hint)


TASKS = {
    "match": lambda item: MCQItem(
        item.index, f"Which option says {item.options[item.answer]}?", item.options, item.answer, ()
    ),
    "copy": lambda item: MCQItem(item.index, f"The answer is {item.answer}.", item.options, item.answer, ()),
    # retrieve the answer from the described scene, then point at its option: a choice without seeing
    "compose": lambda item: item,
}


def pointer(lr: float, steps: int, rope_theta: float | None, heads: int | None = None, batch_size: int = 32,
            task: str = "match", two_option_steps: int = 0, after_match: int = 0) -> None:  # fmt: skip
    backbone = build_untrained("demo")
    model = backbone.model
    if rope_theta is not None or heads is not None:
        config = build_config("demo")
        if rope_theta is not None:
            config.text_config.rope_parameters["rope_theta"] = rope_theta
        if heads is not None:  # query and key-value heads, same hidden size (smaller heads)
            config.text_config.num_attention_heads = config.text_config.num_key_value_heads = heads
            config.text_config.head_dim = config.text_config.hidden_size // heads
            config.text_config.rope_parameters["mrope_section"] = _mrope_section(config.text_config.head_dim)
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.train()
    tokenizer = backbone.tokenizer
    letters = _letter_ids(tokenizer)
    option_ids = torch.tensor([letters[k] for k in "ABCD"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    start, hits, by_category = time.perf_counter(), [], {}
    for step in range(after_match + steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        first = step * batch_size
        # --after-match: train-demo's pointing curriculum first (text-only matching, 75% of it with 2 options)
        now, two_options = (
            ("match", step < 0.75 * after_match)
            if step < after_match
            else (task, step - after_match < two_option_steps)
        )
        items = [
            _described(first + i) if now == "compose" else demo_item("train", first + i) for i in range(batch_size)
        ]
        if two_options:  # curriculum: point between two options before four
            # Which option is right: alternating by row for matching (as in train-demo); a seeded coin per
            # question for compose, whose question type cycles with the row and would give it away.
            items = [
                _two_options(
                    item, right_first=random.Random(item.index).random() < 0.5 if now == "compose" else i % 2 == 0
                )
                for i, item in enumerate(items)
            ]
        samples = [Sample(TASKS[now](it).prompt()) for it in items]
        inputs = build_inputs(tokenizer, backbone.image_processor, samples)
        target = torch.tensor([letters[it.answer] for it in items])
        logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        right = (option_ids[logits[:, option_ids].argmax(-1)] == target).tolist()
        hits.append(sum(right) / len(right))
        for item, hit in zip(items, right):
            by_category.setdefault(item.category, []).append(hit)
        if (step + 1) % 50 == 0:
            per_type = (
                " ".join(f"{name} {sum(h) / len(h):.2f}" for name, h in by_category.items()) if now == "compose" else ""
            )
            by_category = {}
            print(f"{now} ({2 if two_options else 4} options): lr {lr} theta {rope_theta or 'default'} heads {heads or 'default'} step {step + 1}: accuracy over the last 50 steps "
                  f"{sum(hits[-50:]) / 50:.3f} {per_type}, loss {float(loss.detach()):.3f}, {time.perf_counter() - start:.0f} s",
                  flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    state = commands.add_parser("state")
    state.add_argument("path", type=Path)
    point = commands.add_parser("pointer")
    point.add_argument("--lr", type=float, default=1e-3)
    point.add_argument("--steps", type=int, default=400)
    point.add_argument("--rope-theta", type=float)
    point.add_argument("--task", choices=sorted(TASKS), default="match", help="copy: a control the model must learn")
    point.add_argument("--two-option-steps", type=int, default=0, help="curriculum: first steps with 2 options")
    point.add_argument("--heads", type=int, help="LLM attention heads (query = key-value), default the spec's 4/2")
    point.add_argument(
        "--after-match", type=int, default=0, help="first this many steps of matching (train-demo's curriculum)"
    )
    args = parser.parse_args()
    if args.command == "state":
        skills(args.path)
    else:
        pointer(
            args.lr, args.steps, args.rope_theta, args.heads, task=args.task, two_option_steps=args.two_option_steps,
            after_match=args.after_match,
        )  # fmt: skip


if __name__ == "__main__":
    main()
