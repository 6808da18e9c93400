"""Which skill the `demo` backbone has learned: the figures behind "Status of the demo backbone".

    python benchmarks/demo_skills.py state OUT/train_state.pt   # OUT: an illava-tune train-demo --out folder
    python benchmarks/demo_skills.py pointer --lr 1e-3 --steps 400 [--rope-theta 10000] [--heads 8] [--task copy] [--two-option-steps 300]

``state`` loads a training state written by `illava-tune train-demo` and reports, for each way a
training question is asked (list / match / open / choice), how often the first answer token is
right on 192 training-stream questions the run has not reached (steps 100000-100002).

``pointer`` trains a fresh `demo` model on the text-only matching task alone ("Which option says
purple?" with the benchmark's option layout; answer: the letter), and prints the accuracy over each
50 steps: can this LLM learn to point at an option at all, and how fast. ``--task copy`` ("The answer
is B.") is the control: the same loop on a task that needs no pointing.
"""

from __future__ import annotations

import argparse
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
from illava_tune.train_demo import TrainConfig, _batch, _question_form, _two_options  # noqa: E402
from profiler.datasets import MCQItem  # noqa: E402
from profiler.demo_vqa import COLOURS, SHAPES, demo_item, demo_scene  # noqa: E402
from profiler.measure import _letter_ids  # noqa: E402


@torch.no_grad()
def skills(state_path: Path, batch_size: int = 64, first_step: int = 100000, batches: int = 3) -> None:
    backbone = build_untrained("demo")
    state = torch.load(state_path, weights_only=True, map_location="cpu")
    backbone.model.load_state_dict(state["model"])
    model = backbone.model.eval()
    tokenizer = backbone.tokenizer
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    probe = torch.nn.Linear(DEMO_SPEC.text_hidden, len(COLOURS) + len(SHAPES) + 2)
    probe.load_state_dict(state["probe"])
    captured: list = []
    model.model.visual.register_forward_hook(lambda module, args, output: captured.append(output))
    right: dict[str, list[int]] = {}
    config = TrainConfig(batch_size=batch_size)
    for step in range(first_step, first_step + batches):
        inputs, labels, _, token_labels = _batch(backbone, config, step, _letter_ids(tokenizer), end_id)
        width = labels.shape[1]
        predicted = model(**inputs, logits_to_keep=width + 1, use_cache=False).logits[:, :width].argmax(-1)
        features = captured.pop().pooler_output
        named = probe(torch.cat(features) if isinstance(features, list | tuple) else features)
        on_object = token_labels[:, 0] > 0  # the probe's colour and shape on cells that hold an object
        colours = len(COLOURS) + 1
        right.setdefault("probe colour", []).extend(
            (named[on_object, :colours].argmax(-1) == token_labels[on_object, 0]).tolist()
        )
        right.setdefault("probe shape", []).extend(
            (named[on_object, colours:].argmax(-1) == token_labels[on_object, 1]).tolist()
        )
        for row in range(batch_size):
            scene = demo_scene("train", step * batch_size + row)
            form = _question_form(step * batch_size + row, scene.category)
            first = int((labels[row] != -100).nonzero()[0])
            right.setdefault(form, []).append(int(predicted[row, first] == labels[row, first]))
    print(f"training state at step {state['step']}: first answer token right (probe: image tokens on an object)")
    for form, hits in right.items():
        print(f"  {form:<12} {sum(hits):>4}/{len(hits)} = {sum(hits) / len(hits):.1%}")


TASKS = {
    "match": lambda item: f"Which option says {item.options[item.answer]}?",  # point at the option by content
    "copy": lambda item: f"The answer is {item.answer}.",  # control: the letter is in the question
}


def pointer(lr: float, steps: int, rope_theta: float | None, heads: int | None = None, batch_size: int = 32,
            task: str = "match", two_option_steps: int = 0) -> None:  # fmt: skip
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
    start, hits = time.perf_counter(), []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        items = [demo_item("train", step * batch_size + i) for i in range(batch_size)]
        if step < two_option_steps:  # curriculum: point between two options before four
            items = [_two_options(item, right_first=i % 2 == 0) for i, item in enumerate(items)]
        samples = [Sample(MCQItem(it.index, TASKS[task](it), it.options, it.answer, ()).prompt()) for it in items]
        inputs = build_inputs(tokenizer, backbone.image_processor, samples)
        target = torch.tensor([letters[it.answer] for it in items])
        logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        hits.append(float((option_ids[logits[:, option_ids].argmax(-1)] == target).float().mean()))
        if (step + 1) % 50 == 0:
            options = 2 if step < two_option_steps else 4
            print(f"{task} ({options} options): lr {lr} theta {rope_theta or 'default'} heads {heads or 'default'} step {step + 1}: accuracy over the last 50 steps "
                  f"{sum(hits[-50:]) / 50:.3f}, loss {float(loss.detach()):.3f}, {time.perf_counter() - start:.0f} s",
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
    args = parser.parse_args()
    if args.command == "state":
        skills(args.path)
    else:
        pointer(
            args.lr, args.steps, args.rope_theta, args.heads, task=args.task, two_option_steps=args.two_option_steps
        )


if __name__ == "__main__":
    main()
