"""Which skill of the `demo` recipe learns how fast: the experiments behind "Status of the demo backbone".

    python benchmarks/demo_skills.py encoder [--steps 400] [--lr 1e-3]   # the encoder and probe alone
    python benchmarks/demo_skills.py binding [--steps 400] [--lr 1e-3]   # the LLM alone, scenes in words

``encoder`` trains a fresh `demo` vision encoder with `illava-tune train-demo`'s probe and labels
(colour under each token, shape at object centres, row and column) and nothing else, and prints every
25 steps how often the probe names the shape at object centres, by object size, and the colour.

``binding`` trains a fresh `demo` model on train-demo's conversations with the image replaced by
the scene written out ("In the image: purple cross, orange circle."; position questions left out,
since names say nothing about positions), and prints every 25 steps how often each type of
question is answered right (all answer tokens, teacher forced). Nothing has to be seen: this is
whether the LLM learns to bind an attribute to the object a question names.

Both use the `train` stream from item 10,000,000 on (not what a train-demo run of this length
reads), 32 scenes a step, AdamW with a 50-step warm-up to a constant `--lr`.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from illava.backbones import DEMO_SPEC, build_untrained  # noqa: E402
from illava.inputs import Sample, _chat, build_inputs  # noqa: E402
from illava_tune.train_demo import (  # noqa: E402
    _answer_labels,
    _conversation,
    _probe_loss_and_hits,
    _probe_sizes,
    _token_labels,
)
from profiler.accuracy import END_OF_TURN  # noqa: E402
from profiler.demo_vqa import SHAPES, demo_scene  # noqa: E402

FIRST_ITEM = 10_000_000
BATCH = 32


def _report(step: int, start: float, loss: float, hits: dict[str, list[bool]]) -> None:
    rates = " ".join(f"{name}={sum(h) / len(h):.2f}" for name, h in sorted(hits.items()) if h)
    print(f"{step} {time.perf_counter() - start:.0f}s loss {loss:.3f} {rates}", flush=True)


def _warm(optimizer, lr: float, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / 50)


def encoder(steps: int, lr: float) -> None:
    backbone = build_untrained("demo", seed=0)
    visual = backbone.model.model.visual.train()
    probe = torch.nn.Linear(DEMO_SPEC.text_hidden, sum(_probe_sizes(224)))
    optimizer = torch.optim.AdamW([*visual.parameters(), *probe.parameters()], lr=lr, betas=(0.9, 0.98))
    hits: dict[str, list[bool]] = {}
    start = time.perf_counter()
    for step in range(steps):
        _warm(optimizer, lr, step)
        scenes = [demo_scene("train", FIRST_ITEM + step * BATCH + i) for i in range(BATCH)]
        samples = [Sample("<image>", list(scene.item().images)) for scene in scenes]
        inputs = build_inputs(backbone.tokenizer, backbone.image_processor, samples)
        features = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        features = torch.cat(features) if isinstance(features, list | tuple) else features
        labels = torch.cat([_token_labels(scene) for scene in scenes])
        logits = probe(features)
        loss, probe_hits = _probe_loss_and_hits(logits, labels, 224)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(visual.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            shape_head = torch.split(logits, _probe_sizes(224), dim=-1)[1]
            cells = 224 // 28
            for i, scene in enumerate(scenes):
                for obj in scene.objects:
                    x, y = obj.centre
                    token = i * cells * cells + int(y) // 28 * cells + int(x) // 28
                    hits.setdefault(f"shape_{obj.size}", []).append(
                        int(shape_head[token].argmax()) == SHAPES.index(obj.shape) + 1
                    )
            hits.setdefault("colour", []).extend(probe_hits["colour"].tolist())
        if (step + 1) % 25 == 0:
            _report(step + 1, start, float(loss.detach()), hits)
            hits = {}


def _described(scene, index: int) -> tuple[str, list[str]]:
    """The conversation text with the scene in words before the first question, and its categories."""
    items = [dataclasses.replace(item, images=()) for item in _conversation(scene, 5) if item.category != "position"]
    objects = list(scene.objects)
    random.Random(index).shuffle(objects)
    described = "In the image: " + ", ".join(obj.name for obj in objects) + ".\n"
    text = "".join(
        _chat((described if turn == 0 else "") + item.prompt("text")) + f"{item.options[item.answer]}{END_OF_TURN}\n"
        for turn, item in enumerate(items)
    )
    return text, [item.category for item in items]


def binding(steps: int, lr: float) -> None:
    backbone = build_untrained("demo", seed=0)
    model, tokenizer = backbone.model.train(), backbone.tokenizer
    optimizer = torch.optim.AdamW(model.model.language_model.parameters(), lr=lr, betas=(0.9, 0.98))
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    hits: dict[str, list[bool]] = {}
    start = time.perf_counter()
    for step in range(steps):
        _warm(optimizer, lr, step)
        indices = [FIRST_ITEM + step * BATCH + i for i in range(BATCH)]
        conversations = [_described(demo_scene("train", i), i) for i in indices]
        samples = [Sample(text) for text, _ in conversations]
        inputs = build_inputs(tokenizer, backbone.image_processor, samples, chat=False)
        rows = [_answer_labels(ids, header, end_id) for ids in inputs["input_ids"]]
        labels = torch.stack([row_labels for row_labels, _ in rows])
        hidden = model.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
        predicts = labels[:, 1:] != -100
        targets = labels[:, 1:][predicts]
        logits = model.lm_head(hidden[predicts]).float()
        loss = torch.nn.functional.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            right = torch.zeros_like(predicts)
            right[predicts] = logits.argmax(-1) == targets
            for row, ((_, spans), (_, categories)) in enumerate(zip(rows, conversations, strict=True)):
                for category, (first, last) in zip(categories, spans, strict=True):
                    hits.setdefault(category, []).append(bool(right[row, first - 1 : last].all()))
        if (step + 1) % 25 == 0:
            _report(step + 1, start, float(loss.detach()), hits)
            hits = {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=["encoder", "binding"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"{args.experiment}: {args.steps} steps of {BATCH}, lr {args.lr}, {torch.get_num_threads()} threads")
    (encoder if args.experiment == "encoder" else binding)(args.steps, args.lr)


if __name__ == "__main__":
    main()
