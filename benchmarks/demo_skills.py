"""Which skill of the `demo` recipe learns how fast: the experiments behind "Status of the demo backbone".

    python benchmarks/demo_skills.py encoder [--steps 400] [--lr 1e-3]   # the encoder and probe alone
    python benchmarks/demo_skills.py binding [--steps 400] [--lr 1e-3]   # the LLM alone, scenes in words
    python benchmarks/demo_skills.py lookup --checkpoint DIR [--scenes 256] [--layer 3]  # a trained model
    python benchmarks/demo_skills.py kept [--checkpoint demo] [--scenes 256] [--seeds 3]  # what merging keeps

``encoder`` trains a fresh `demo` vision encoder with `illava-tune train-demo`'s probe and labels
(colour under each token, shape at object centres, row and column) and nothing else, and prints every
25 steps how often the probe names the shape at object centres, by object size, and the colour.

``binding`` trains a fresh `demo` model on train-demo's conversations with the image replaced by
the scene written out ("In the image: purple cross, orange circle."; position questions left out,
since names say nothing about positions), and prints every 25 steps how often each type of
question is answered right (all answer tokens, teacher forced). Nothing has to be seen: this is
whether the LLM learns to bind an attribute to the object a question names.

``lookup`` reads a trained checkpoint: per question type, the share answered right (teacher forced),
how often the attention heads of `--layer` that `--ground-weight` supervises look hardest at the
objects the question names from the answering position, and the accuracy when they do and when they
do not: a lookup that fails from a readout that fails. The heads are those the checkpoint was trained
with (`--ground-heads`, read from its training.json): with 2 or 3, a position question's object on
head 0 and its reference on head 1, and "finds" means both heads do; with 3, the other questions'
objects on head 2.

``kept`` runs a trained checkpoint on the first `--scenes` test questions with the whole removal
in the encoder (the paper's encoder layers, at each of the paper's ratios) and counts which LLM
image tokens (28x28-pixel cells) survive, for importance selection and for random selection over
`--seeds` seeds: the share of kept cells that lie on an object (most of the cell covered by one),
and the share of objects, by size, that keep at least one of their cells. With nothing kept on it,
an object can reach the LLM only through a recycled cluster token.

``encoder``, ``binding`` and ``lookup`` use the `train` stream from item 10,000,000 on (not what a train-demo run of this length
reads), 32 scenes a step; ``encoder`` and ``binding`` train with AdamW, a 50-step warm-up to a
constant `--lr`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import illava  # noqa: E402
from illava import PAPER_REDUCTIONS  # noqa: E402
from illava.backbones import DEMO_SPEC, build_untrained, load_backbone  # noqa: E402
from illava.engine.capture import capture  # noqa: E402
from illava.inputs import Sample, build_inputs, chat_turn  # noqa: E402
from illava_tune.train_demo import (  # noqa: E402
    TrainConfig,
    answer_labels,
    cell_labels,
    cell_owners,
    conversation,
    grounding_loss,
    probe_loss_and_hits,
    probe_sizes,
    training_batch,
)
from profiler.accuracy import end_of_turn  # noqa: E402
from profiler.demo_vqa import SHAPES, SIZES, demo_scene  # noqa: E402

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
    probe = torch.nn.Linear(DEMO_SPEC.text_hidden, sum(probe_sizes(224)))
    optimizer = torch.optim.AdamW([*visual.parameters(), *probe.parameters()], lr=lr, betas=(0.9, 0.98))
    hits: dict[str, list[bool]] = {}
    start = time.perf_counter()
    for step in range(steps):
        _warm(optimizer, lr, step)
        scenes = [demo_scene("train", FIRST_ITEM + step * BATCH + i) for i in range(BATCH)]
        samples = [Sample("<image>", list(scene.item().images)) for scene in scenes]
        inputs = build_inputs(backbone, samples)
        features = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        features = torch.cat(features) if isinstance(features, list | tuple) else features
        labels = torch.cat([cell_labels(scene) for scene in scenes])
        logits = probe(features)
        loss, probe_hits = probe_loss_and_hits(logits, labels, 224)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(visual.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            shape_head = torch.split(logits, probe_sizes(224), dim=-1)[1]
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


def _described(backbone, scene, index: int) -> tuple[str, list[str]]:
    """The conversation text with the scene in words before the first question, and its categories."""
    items = [dataclasses.replace(item, images=()) for item in conversation(scene, 5) if item.category != "position"]
    objects = list(scene.objects)
    random.Random(index).shuffle(objects)
    described = "In the image: " + ", ".join(obj.name for obj in objects) + ".\n"
    text = "".join(
        chat_turn(backbone, (described if turn == 0 else "") + item.prompt("text"))
        + f"{item.options[item.answer]}{end_of_turn(backbone)}\n"
        for turn, item in enumerate(items)
    )
    return text, [item.category for item in items]


def binding(steps: int, lr: float) -> None:
    backbone = build_untrained("demo", seed=0)
    model, tokenizer = backbone.model.train(), backbone.tokenizer
    optimizer = torch.optim.AdamW(model.model.language_model.parameters(), lr=lr, betas=(0.9, 0.98))
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn(backbone))
    hits: dict[str, list[bool]] = {}
    start = time.perf_counter()
    for step in range(steps):
        _warm(optimizer, lr, step)
        indices = [FIRST_ITEM + step * BATCH + i for i in range(BATCH)]
        conversations = [_described(backbone, demo_scene("train", i), i) for i in indices]
        samples = [Sample(text) for text, _ in conversations]
        inputs = build_inputs(backbone, samples, chat=False)
        rows = [answer_labels(ids, header, end_id) for ids in inputs["input_ids"]]
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


@torch.no_grad()
def lookup(checkpoint: str, scenes: int, layer: int) -> None:
    """Per question type: how often the trained model answers right (teacher forced), how often the
    supervised heads of `layer` look hardest at the objects the question names from the answering
    position (and the mean attention mass they put there), and the accuracy when they do and when
    they do not. Tells a lookup that fails (the head does not find the object) from a readout that
    fails (it finds it, the answer is still wrong)."""
    backbone = load_backbone(checkpoint)
    model = backbone.model.eval()
    summary = Path(checkpoint) / "training.json"
    heads = json.loads(summary.read_text())["config"].get("ground_heads", 1) if summary.is_file() else 1
    config = TrainConfig(batch_size=BATCH, ground_layer=layer, ground_heads=heads)
    attention = model.model.language_model.layers[layer].self_attn
    rows: dict[str, list[tuple[bool, bool, float]]] = {}
    start = time.perf_counter()
    batches = -(-scenes // BATCH)
    for step in range(batches):
        inputs, labels, answers, _, grounds = training_batch(backbone, config, FIRST_ITEM // BATCH + step)
        with capture(attention) as seen:
            hidden = model.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
        predicts = labels[:, 1:] != -100
        right = torch.zeros_like(predicts)
        right[predicts] = model.lm_head(hidden[predicts]).argmax(-1) == labels[:, 1:][predicts]
        losses, hits = grounding_loss(
            seen.query, seen.key, attention.scaling, inputs, grounds, model.config.image_token_id
        )
        found: dict[tuple[int, int], list[tuple[bool, float]]] = {}  # per answer, one entry per head
        for (row, at, *_), hit, loss in zip(grounds, hits, losses):
            found.setdefault((row, at), []).append((bool(hit), float(torch.exp(-loss))))
        for category, row, first, last in answers:
            per_head = found.get((row, first - 1), [(False, float("nan"))])
            hit, mass = all(h for h, _ in per_head), sum(m for _, m in per_head) / len(per_head)
            rows.setdefault(category, []).append((bool(right[row, first - 1 : last].all()), hit, mass))
    print(f"{sum(map(len, rows.values()))} answers about {batches * BATCH} scenes, layer {layer}, {heads} head(s), "
          f"{time.perf_counter() - start:.0f}s")  # fmt: skip
    print("| question | answers | right | head finds the object | mass on it | right when found | right when not |")
    print("|---|---|---|---|---|---|---|")
    for category, results in sorted(rows.items()):
        grounded = [(r, hit, mass) for r, hit, mass in results if mass == mass]  # nan: names no object
        right = f"{sum(r for r, _, _ in results) / len(results):.0%}"
        if not grounded:
            print(f"| {category} | {len(results)} | {right} | - | - | - | - |")
            continue
        right_when = [[r for r, hit, _ in grounded if hit == want] for want in (True, False)]
        rates = [f"{sum(r) / len(r):.0%} of {len(r)}" if r else "-" for r in right_when]
        finds = sum(hit for _, hit, _ in grounded) / len(grounded)
        mass = sum(m for _, _, m in grounded) / len(grounded)
        print(f"| {category} | {len(results)} | {right} | {finds:.0%} | {mass:.2f} | {rates[0]} | {rates[1]} |")


@torch.inference_mode()
def kept(checkpoint: str, scenes: int, seeds: int) -> None:
    """Which LLM image tokens an encoder-only removal keeps, importance vs random (see the module doc)."""
    backbone = load_backbone(checkpoint)
    model = backbone.model.eval()
    tests = [demo_scene("test", index) for index in range(scenes)]
    owners = [cell_owners(scene) for scene in tests]
    base = sum(o >= 0 for cells in owners for o in cells) / sum(map(len, owners))
    print(f"{scenes} test scenes; {base:.1%} of all cells lie on an object")
    print("| removed | selection | kept cells on objects | objects keeping a cell: " + " / ".join(SIZES) + " |")
    print("|---|---|---|---|")
    for ratio in PAPER_REDUCTIONS:
        staged = illava.paper_default_for(model, ratio).with_(encoder_share=1.0)
        methods = {"importance": staged} | {f"random {s}": staged.with_(method="random", seed=s) for s in range(seeds)}
        for name, schedule in methods.items():
            illava.remove(model)
            illava.apply(model, schedule)
            on_object = total = 0
            survived: dict[str, list[bool]] = {size: [] for size in SIZES}
            for start in range(0, scenes, BATCH):
                chunk = tests[start : start + BATCH]
                batch = build_inputs(backbone, [scene.item().to_sample() for scene in chunk])  # fmt: skip
                model(**batch, logits_to_keep=1)
                for scene, cells, ids in zip(
                    chunk, owners[start : start + BATCH], illava.last_stats(model).kept_units, strict=True
                ):
                    kept_owners = [cells[i] for i in ids.tolist()]
                    keep = set(kept_owners)
                    on_object += sum(owner >= 0 for owner in kept_owners)
                    total += len(kept_owners)
                    for index, obj in enumerate(scene.objects):
                        survived[obj.size].append(index in keep)
            shares = " / ".join(f"{sum(v) / len(v):.0%}" if v else "-" for v in survived.values())
            print(f"| {ratio:.1%} | {name} | {on_object / total:.1%} | {shares} |", flush=True)
    illava.remove(model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=["encoder", "binding", "lookup", "kept"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--checkpoint", help="lookup: a train-demo output folder; kept: demo by default")
    parser.add_argument("--scenes", type=int, default=256, help="lookup: scenes (5 questions each); kept: test scenes")
    parser.add_argument("--layer", type=int, default=TrainConfig.ground_layer, help="lookup: the LLM layer")
    parser.add_argument("--seeds", type=int, default=3, help="kept: random-selection seeds")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.experiment == "kept":
        kept(args.checkpoint or "demo", args.scenes, args.seeds)
        return
    if args.experiment == "lookup":
        if not args.checkpoint:
            parser.error("lookup needs --checkpoint (a train-demo output folder)")
        lookup(args.checkpoint, args.scenes, args.layer)
        return
    print(f"{args.experiment}: {args.steps} steps of {BATCH}, lr {args.lr}, {torch.get_num_threads()} threads")
    (encoder if args.experiment == "encoder" else binding)(args.steps, args.lr)


if __name__ == "__main__":
    main()
