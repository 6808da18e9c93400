"""Train the `demo` backbone on the demo VQA benchmark: `illava-tune train-demo`.

The architecture is `illava.backbones.DEMO_SPEC` (a real Qwen2.5-VL: windowed and full-attention vision
blocks, 2x2 patch merger, GQA, 3-D mRoPE), initialised with seeded weights and trained from scratch on
the `train` stream of `profiler.demo_vqa` (image i of step s is item s*batch+i, so a run is a function
of its seed and settings). Two phases:

1. `encoder_steps` steps of the encoder alone with a training-only linear probe on the image tokens it
   hands the LLM: the colour under each token, the shape of the object centred on it, and the token's
   row and column (the encoder has no absolute position embedding). Dense labels teach it to see and
   to say where in minutes; the probe is not saved.
2. The whole model (the probe still on) on conversations about each image: the benchmark's own
   question first, asked exactly as the profiler asks it, then one question of each other type
   about the same image (answers worked out from the scene's objects). Each question is answered
   with the option's *text*; the loss is cross-entropy on the answer tokens and the ``<|im_end|>``
   after each, plus `ground_weight` times the grounding loss (`grounding_loss`: an attention head
   looks at the objects each question names: a position question's two on heads 0 and 1, the others on head 2). Five answers share one pass of the encoder.

The checkpoint's config says ``mcq_answer = "text"``, so the profiler scores it by the likelihood of
each option's text (`profiler.accuracy`). Answering with the option letter instead asks this small
LLM to find the answer and then point at the letter of the option that says it; three sessions of
runs with letters stayed at chance for up to 44,800 questions (docs/benchmarks.md, "Status of the
demo backbone").

The run prints a progress line every `--log-every` steps (loss, training accuracy, samples/s, ETA) and
the validation accuracy per question type every `--eval-every` steps. It saves a resumable state
(`train_state.pt`: weights, optimizer, step) every `--save-every-s` seconds, written atomically; `--resume`
continues from it, with the same settings or a larger `--steps` while the learning rate has not begun
to decay (it holds its peak until the last `decay_fraction` of the whole-model phase). At the end it
writes the checkpoint (safetensors, config, tokenizer, image processor, generation config) and
``training.json`` with the settings, time taken and accuracy on the validation split, the test split
and the test split's first 100 questions (the figure `tests/illava/test_demo_backbone.py` checks the
committed checkpoint against).

Same seed and settings on the same machine and thread count give the same weights; other CPUs can
differ in the last bits of a float sum, and so in the weights after training.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import transformers

from illava.backbones import DEMO_CHECKPOINT, DEMO_SPEC, Backbone, build_untrained, save_backbone
from illava.engine.capture import capture
from illava.inputs import Sample, build_inputs, chat_turn
from profiler.accuracy import accuracy_by_category, choose, end_of_turn
from profiler.demo_vqa import (
    COLOURS,
    DEFAULT_IMAGE_SIZE,
    DIRECTIONS,
    SHAPES,
    absent_lookalikes,
    demo_scene,
    demo_split,
    four_options,
)
from profiler.items import MCQItem

STATE_FILE = "train_state.pt"
SLICE = 100  # test questions the committed checkpoint's test re-scores


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2300
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    image_size: int = DEFAULT_IMAGE_SIZE
    eval_every: int = 250
    eval_items: int = 250
    probe_weight: float = 1.0
    encoder_steps: int = 450  # the first steps train the encoder and the probe alone (see train)
    turns: int = 5  # questions per image in one training conversation (the benchmark's first, see conversation)
    decay_fraction: float = 0.35  # the share of the whole-model phase, at its end, over which the LR decays
    ground_weight: float = 0.5  # weight of the grounding loss (see grounding_loss); 0 leaves it out
    ground_layer: int = 3  # the LLM layer whose attention heads the grounding loss supervises
    ground_heads: int = 3  # 1: head 0 for all named objects; 2: a position question's two on heads 0 and 1;
    # 3: as 2, and the objects other questions name on head 2 (with 4 query heads on 2 KV heads, its own keys)

    def lr_at(self, step: int) -> float:
        """Each phase warms up linearly over `warmup_steps` and then holds the peak; the whole-model phase
        decays to `min_lr_ratio` of it on a cosine over its last `decay_fraction`. The hold matters: the
        LLM starts binding an attribute to the object a question names only after ~550 steps of that
        phase (docs/benchmarks.md, run 9), and a schedule already decaying by then slows that down."""
        phase_start = 0 if step < self.encoder_steps else self.encoder_steps
        if step - phase_start < self.warmup_steps:
            return self.lr * (step - phase_start + 1) / self.warmup_steps
        span = max(1, round((self.steps - self.encoder_steps) * self.decay_fraction))
        decay_start = self.steps - span
        if step < self.encoder_steps or step < decay_start:
            return self.lr
        progress = (step - decay_start) / span
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# Training conversations: the benchmark's question, then more questions about the same image
# ---------------------------------------------------------------------------------------------

MIN_SEPARATION = 0.2  # of the image side: position questions about two objects at least this far apart
MAX_ACROSS = 0.45  # times that distance: how far off the named axis they may be (as in the benchmark)


def _item(scene, category: str, question: str, options: dict[str, str], answer: str) -> MCQItem:
    return MCQItem(f"{scene.stream}-{scene.index}-{category}", question, options, answer, (), category)


def _direction(a, b, image_size: int) -> str | None:
    """Where `a` is relative to `b` when one axis clearly dominates (the benchmark's rule), else None."""
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = ax - bx, ay - by
    if abs(dx) >= MIN_SEPARATION * image_size and abs(dy) <= MAX_ACROSS * abs(dx):
        return "left" if dx < 0 else "right"
    if abs(dy) >= MIN_SEPARATION * image_size and abs(dx) <= MAX_ACROSS * abs(dy):
        return "above" if dy < 0 else "below"
    return None


def _more_questions(scene, rng: random.Random) -> list[MCQItem]:
    """One more question of each type other than the scene's own about `scene`'s objects, where the
    scene allows one, answers computed from the objects and options drawn as the benchmark draws
    them; in a seeded order."""
    objects, size = scene.objects, scene.image_size
    shapes, colours = Counter(o.shape for o in objects), Counter(o.colour for o in objects)
    out = []
    if unique := [o for o in objects if shapes[o.shape] == 1]:
        target = rng.choice(unique)
        options, answer = four_options(rng, target.colour, list(COLOURS))
        out.append(_item(scene, "colour", f"What colour is the {target.shape}?", options, answer))
    if unique := [o for o in objects if colours[o.colour] == 1]:
        target = rng.choice(unique)
        options, answer = four_options(rng, target.shape, SHAPES)
        out.append(_item(scene, "shape", f"What shape is the {target.colour} object?", options, answer))
    if rng.random() < 0.5:
        shape = rng.choice(SHAPES)
        count, question = shapes[shape], f"How many {shape}s are there?"
    else:
        colour = rng.choice(list(COLOURS))
        count, question = colours[colour], f"How many {colour} objects are there?"
    if count <= 3:
        options, answer = four_options(rng, str(count), ("0", "1", "2", "3"))
        out.append(_item(scene, "count", question, options, answer))
    pairs = [(a, b) for a in objects for b in objects if a is not b]
    rng.shuffle(pairs)
    for a, b in pairs:
        if direction := _direction(a, b, size):
            options, answer = four_options(rng, direction, DIRECTIONS)
            question = f"Where is the {a.name} relative to the {b.name}?"
            out.append(_item(scene, "position", question, options, answer))
            break
    lookalikes = absent_lookalikes(objects)
    if objects and len(lookalikes) >= 3:
        texts = [rng.choice(objects).name, *rng.sample(lookalikes, 3)]
        options, answer = four_options(rng, texts[0], texts)
        out.append(_item(scene, "presence", "Which of these objects is in the image?", options, answer))
    out = [item for item in out if item.category != scene.category]
    rng.shuffle(out)
    return out


def conversation(scene, turns: int) -> list[MCQItem]:
    """The questions of one training conversation: the benchmark's own question about the scene
    first (asked exactly as the benchmark asks it), then up to `turns` - 1 more about the same image."""
    rng = random.Random(f"illava-demo-train-turns:{scene.stream}:{scene.index}")
    return [scene.item(), *_more_questions(scene, rng)[: turns - 1]]


def conversation_text(backbone: Backbone, items: list[MCQItem]) -> str:
    """The chat: each question asked for the option's text and answered with it."""
    end = end_of_turn(backbone)
    return "".join(chat_turn(backbone, item.prompt("text")) + f"{item.options[item.answer]}{end}\n" for item in items)


def answer_labels(ids: torch.Tensor, header: list[int], end_id: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Labels (L,) of one left-padded row: the tokens of every assistant answer and the end-of-turn
    after it (-100 elsewhere), and each answer's (first, last) label position."""
    labels = torch.full_like(ids, -100)
    spans, values, n = [], ids.tolist(), len(header)
    for start in range(len(values) - n + 1):
        if values[start : start + n] == header:
            first = start + n
            last = values.index(end_id, first)
            labels[first : last + 1] = ids[first : last + 1]
            spans.append((first, last))
    return labels, spans


TOKEN_PIXELS = 28  # one LLM image token of the demo architecture covers 28x28 pixels (2x2 patches of 14)


def cell_labels(scene) -> torch.Tensor:
    """(tokens, 4) in the raster order image tokens reach the LLM: the colour class of the object
    covering most of each 28x28 cell (0 = background); the shape class of the object whose centre is
    in the cell (-100, not scored, elsewhere: the corner of a large circle and of a large square look
    alike, and labelling every covered cell, or also the background, made the probe learn shapes far
    slower); the cell's row and column."""
    cells = scene.image_size // TOKEN_PIXELS
    labels = torch.zeros(cells * cells, 4, dtype=torch.long)
    labels[:, 2] = torch.arange(cells * cells) // cells
    labels[:, 3] = torch.arange(cells * cells) % cells
    colour_class = {colour: i + 1 for i, colour in enumerate(COLOURS)}
    for cell, owner in enumerate(cell_owners(scene)):
        if owner >= 0:
            labels[cell, 0] = colour_class[scene.objects[owner].colour]
    labels[:, 1] = -100
    for obj in scene.objects:
        labels[_centre_cell(obj, cells), 1] = SHAPES.index(obj.shape) + 1
    return labels


def cell_owners(scene) -> list[int]:
    """Per token cell in raster order: the index of the object covering most of it, -1 for background."""
    cells = scene.image_size // TOKEN_PIXELS
    owners = []
    for row in range(cells):
        for col in range(cells):
            x0, y0 = col * TOKEN_PIXELS, row * TOKEN_PIXELS
            best, best_area = -1, 0
            for index, obj in enumerate(scene.objects):
                bx0, by0, bx1, by1 = obj.box
                w = min(bx1, x0 + TOKEN_PIXELS - 1) - max(bx0, x0) + 1
                h = min(by1, y0 + TOKEN_PIXELS - 1) - max(by0, y0) + 1
                if w > 0 and h > 0 and w * h > best_area:
                    best, best_area = index, w * h
            owners.append(best)
    return owners


def _centre_cell(obj, cells: int) -> int:
    x, y = obj.centre
    return int(y) // TOKEN_PIXELS * cells + int(x) // TOKEN_PIXELS


_NAMING = (  # the question templates of the benchmark and of _more_questions; which group each object is in
    (re.compile(r"What colour is the (\w+)\?"), lambda o, m: 0 if o.shape == m[1] else None),
    (re.compile(r"What shape is the (\w+) object\?"), lambda o, m: 0 if o.colour == m[1] else None),
    (re.compile(r"How many (\w+) objects are there\?"), lambda o, m: 0 if o.colour == m[1] else None),
    (re.compile(r"How many (\w+)s are there\?"), lambda o, m: 0 if o.shape == m[1] else None),
    (  # the object asked about, then the one it is compared with
        re.compile(r"Where is the (\w+ \w+) relative to the (\w+ \w+)\?"),
        lambda o, m: 0 if o.name == m[1] else 1 if o.name == m[2] else None,
    ),
)


def _named_groups(scene, question: str, *, split: bool = True) -> list[list[int]]:
    """The token cells of the objects `question` names (each object's cells and its centre cell,
    sorted), one list per thing it names: two for a position question (the object asked about, then
    the reference) unless not `split`, one otherwise; none when it names no object in the scene (a
    count of 0, a presence question)."""
    found = next(((group_of, m) for pattern, group_of in _NAMING if (m := pattern.fullmatch(question))), None)
    if found is None:
        return []
    group_of, match = found
    cells = scene.image_size // TOKEN_PIXELS
    owners = cell_owners(scene)
    groups: dict[int, set[int]] = {}
    for i, obj in enumerate(scene.objects):
        if (group := group_of(obj, match)) is not None:
            covered = {cell for cell, owner in enumerate(owners) if owner == i}
            groups.setdefault(group if split else 0, set()).update(covered | {_centre_cell(obj, cells)})
    return [sorted(groups[group]) for group in sorted(groups)]


PROBE_TARGETS = ("colour", "shape", "row", "column")
POSITION_WEIGHT = 0.5  # of each of the row and column terms, relative to colour and shape


def probe_sizes(image_size: int) -> tuple[int, ...]:
    """Classes of each PROBE_TARGETS head: colours and shapes with background (0), rows, columns."""
    cells = image_size // TOKEN_PIXELS
    return len(COLOURS) + 1, len(SHAPES) + 1, cells, cells


def probe_loss_and_hits(probe_logits: torch.Tensor, token_labels: torch.Tensor, image_size: int):
    """The probe's loss and, per PROBE_TARGETS, which image tokens that hold an object it names right.

    Colour is over all tokens, background down-weighted (most cells are background); shape only at
    object centres (see `cell_labels`). Row and column are only over
    tokens on an object: the encoder has no absolute position embedding (its
    rotary positions are relative), so this is what makes it say where an object is, which relative
    position questions need."""
    heads = torch.split(probe_logits, probe_sizes(image_size), dim=-1)
    on_object = token_labels[:, 0] > 0
    loss = probe_logits.new_zeros(())
    for i, head in enumerate(heads[:2]):
        weight = torch.ones(head.shape[-1], device=head.device)
        weight[0] = 0.1
        loss = loss + torch.nn.functional.cross_entropy(head, token_labels[:, i], weight=weight, ignore_index=-100)
    if on_object.any():
        for i, head in enumerate(heads[2:], start=2):
            loss = loss + POSITION_WEIGHT * torch.nn.functional.cross_entropy(
                head[on_object], token_labels[on_object, i]
            )
    scored = [on_object, token_labels[:, 1] > 0, on_object, on_object]  # shape: at object centres
    hits = {
        name: head[where].argmax(-1) == token_labels[where, i]
        for i, (name, head, where) in enumerate(zip(PROBE_TARGETS, heads, scored))
    }
    return loss, hits


def training_batch(backbone: Backbone, config: TrainConfig, step: int):
    """Step `step`: the conversations' inputs, their labels (B, L; see answer_labels), the category
    of each answer in row order, each answer's (row, first, last) label position, the probe's
    labels of the image tokens (see cell_labels), and per answer that names objects, (row, the
    position that predicts its first token, the named objects' token cells, category, attention
    head) for `grounding_loss`: one head for all the objects; with `ground_heads` 2, heads 0 and 1
    for the two objects of a position question; with 3, as 2 and head 2 for every other question."""
    tokenizer = backbone.tokenizer
    first = step * config.batch_size
    scenes = [demo_scene("train", first + i, image_size=config.image_size) for i in range(config.batch_size)]
    conversations = [conversation(scene, config.turns) for scene in scenes]
    samples = [Sample(conversation_text(backbone, items), list(items[0].images)) for items in conversations]
    inputs = build_inputs(backbone, samples, chat=False)
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn(backbone))
    labels, answers, grounds = [], [], []
    for row, (ids, items, scene) in enumerate(zip(inputs["input_ids"], conversations, scenes, strict=True)):
        row_labels, spans = answer_labels(ids, header, end_id)
        if len(spans) != len(items):
            raise RuntimeError(f"found {len(spans)} answers in a conversation of {len(items)} turns")
        labels.append(row_labels)
        answers += [(item.category, row, first_pos, last) for item, (first_pos, last) in zip(items, spans)]
        for item, (first_pos, _) in zip(items, spans):
            groups = _named_groups(scene, item.question, split=config.ground_heads >= 2)
            base = 2 if config.ground_heads == 3 and item.category != "position" else 0
            grounds += [(row, first_pos - 1, cells, item.category, base + i) for i, cells in enumerate(groups)]
    token_labels = torch.cat([cell_labels(scene) for scene in scenes])
    return inputs, torch.stack(labels), answers, token_labels, grounds


def grounding_loss(query, key, scaling: float, inputs, grounds, image_token_id: int):
    """Training only: from the position that predicts an answer's first token, a head of the supervised
    layer (`ground_layer`; `query` (B, H, L, D) and `key` (B, H_kv, L, D) are its post-rotary queries and
    keys, captured from its own attention call) should attend to the image tokens of the objects the
    question names (`training_batch`'s grounds say which head, which tokens). Returns, per ground, the
    loss (minus the log of that head's attention mass on those tokens, however it splits it among them)
    and whether its most attended key is one of them.

    Finding the object a question names and reading its other attribute is what this small LLM
    otherwise learns only after hundreds of steps, and for some questions not at all (docs/benchmarks.md);
    this gives the match between the question and those tokens a gradient from the first step."""
    length = query.shape[2]
    device = query.device
    rows, at, heads = (torch.tensor([g[i] for g in grounds], device=device) for i in (0, 1, 4))
    group = query.shape[1] // key.shape[1]  # query heads per KV head
    scores = torch.einsum("gd,gld->gl", query[rows, heads, at], key[rows, heads // group]).float() * scaling
    keys = torch.arange(length, device=device)
    allowed = (keys[None] <= at[:, None]) & inputs["attention_mask"][rows].bool()
    target = torch.zeros_like(allowed)
    for g, (row, _, cells, *_) in enumerate(grounds):
        image_positions = (inputs["input_ids"][row] == image_token_id).nonzero().squeeze(1)  # raster order
        target[g, image_positions[cells]] = True
    scores = scores.masked_fill(~allowed, float("-inf"))
    loss = scores.logsumexp(-1) - scores.masked_fill(~target, float("-inf")).logsumexp(-1)  # (G,)
    hits = target.gather(1, scores.argmax(-1, keepdim=True)).squeeze(1)
    return loss, hits


def _batches(backbone: Backbone, config: TrainConfig, steps: range, workers: int):
    """The batches of `steps` in order; with `workers` > 0 prepared ahead in that many processes (for a
    GPU, where drawing and preprocessing would otherwise starve it; on 2 CPU cores they only compete)."""
    if workers <= 0:
        yield from (training_batch(backbone, config, step) for step in steps)
        return
    import multiprocessing
    from functools import partial

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(partial(_batch_for_worker, config), steps, chunksize=1)


def _batch_for_worker(config: TrainConfig, step: int):
    torch.set_num_threads(1)
    return training_batch(_worker_backbone(), config, step)


@functools.lru_cache(maxsize=1)
def _worker_backbone() -> Backbone:
    """Tokenizer and image processor for a worker process (the model stays in the trainer)."""
    from illava.backbones import build_image_processor, build_tokenizer_for, builtins

    return Backbone(model=None, tokenizer=build_tokenizer_for("demo"), image_processor=build_image_processor("demo"),
                    name="demo", adapter=builtins()["demo"].adapter)  # fmt: skip


def _evaluate(backbone: Backbone, items, batch_size: int) -> dict[str, float]:
    backbone.model.eval()
    result = accuracy_by_category(items, choose(backbone, items, batch_size=batch_size))
    backbone.model.train()
    return result


def _format(accuracy: dict[str, float]) -> str:
    return " ".join(f"{key}={value:.3f}" for key, value in accuracy.items())


def _save_state(path: Path, model, probe, optimizer, step: int, config: TrainConfig, elapsed: float) -> None:
    """Atomic: a crash while writing leaves the previous state intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"model": model.state_dict(), "probe": probe.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "config": asdict(config),
         "elapsed_s": elapsed},
        tmp,
    )  # fmt: skip
    os.replace(tmp, path)


def _check_resumable(state: dict, config: TrainConfig, path: Path) -> None:
    """A state continues only under its own settings, except that `steps` may change while the learning
    rate has not yet begun to decay under either length: every step taken so far then had the same
    learning rate (and the same batch, which depends on the seed and the step alone), so the run is
    the one a straight run of the new length would have been."""
    saved = TrainConfig(**state["config"])
    if asdict(saved) == asdict(config):
        return
    if asdict(replace(saved, steps=config.steps)) != asdict(config):
        raise ValueError(f"--resume: {path} was written with other settings: {state['config']}")
    done = state["step"]
    if config.steps <= done:
        raise ValueError(f"--resume: {path} has already taken {done} steps; --steps {config.steps} is not more")
    if any(saved.lr_at(step) != config.lr_at(step) for step in range(done)):
        raise ValueError(
            f"--resume: {path} has taken {done} steps and its learning rate already differs from that of a "
            f"{config.steps}-step run; --steps can change only before the decay starts"
        )


def train(config: TrainConfig, out: Path, *, resume: bool = False, save_every_s: float = 300.0,
          log_every: int = 25, log=print, final_items: int | None = None, device: str = "cpu",
          workers: int = 0) -> dict:  # fmt: skip
    """Train, write the checkpoint and training.json into `out`, return the summary written.

    `final_items` limits the final validation and test scoring to that many questions (tests use it;
    the recorded figures of the committed checkpoint are on the whole splits)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    backbone = build_untrained("demo", seed=config.seed)
    backbone.model.config.mcq_answer = "text"  # saved in config.json: score it by option text (profiler.accuracy)
    model = backbone.model.to(device).train()
    # A linear probe on the image tokens the encoder hands the LLM, trained to name the colour and
    # shape under each token and where the token is: dense supervision that teaches the encoder to see
    # in hundreds of steps instead of the thousands a 4-way letter needs. Training only; the checkpoint
    # does not hold it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        probe = torch.nn.Linear(DEMO_SPEC.text_hidden, sum(probe_sizes(config.image_size))).to(device)
    adapter = backbone.adapter
    inner = adapter.inner_model(model)
    captured: list = []
    hook = adapter.vision_tower(inner).register_forward_hook(lambda module, args, output: captured.append(output))
    attention = adapter.decoder_attention(adapter.language_model(inner).layers[config.ground_layer])
    image_token_id = model.config.image_token_id
    named = [*model.named_parameters(), *(("probe." + n, p) for n, p in probe.named_parameters())]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if p.ndim < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98),
    )  # fmt: skip
    state_path = out / STATE_FILE
    start, elapsed_before = 0, 0.0
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {out}")
        state = torch.load(state_path, weights_only=True, map_location="cpu")
        _check_resumable(state, config, state_path)
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed_before = state["step"], state["elapsed_s"]
        log(f"resuming at step {start}/{config.steps}")
    val_items = demo_split("val", config.eval_items, image_size=config.image_size)
    params = sum(p.numel() for p in model.parameters())
    log(f"training demo: {params:,} parameters, {config.steps} steps of {config.batch_size}, "
        f"{torch.get_num_threads()} threads")  # fmt: skip

    t0, last_save = time.perf_counter(), time.perf_counter()
    window_loss, window_n, window_t, window_hits = 0.0, 0, time.perf_counter(), {}
    for step, (inputs, labels, answers, token_labels, grounds) in zip(
        range(start, config.steps), _batches(backbone, config, range(start, config.steps), workers)
    ):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        inputs, labels = inputs.to(device), labels.to(device)
        captured.clear()  # evaluation runs the encoder too
        seeing_only = step < config.encoder_steps
        if seeing_only:  # the encoder and the probe alone: three times cheaper a step than the whole model
            adapter.encode_images(inner, inputs)
            loss, answers = torch.zeros((), device=device), []
        else:
            # Position t predicts token t + 1; the LM head runs only where an answer token comes next.
            with capture(attention, enabled=bool(config.ground_weight and grounds)) as seen:  # for grounding_loss
                hidden = inner(**inputs, use_cache=False).last_hidden_state[:, :-1]  # (B, L-1, H)
            predicts = labels[:, 1:] != -100  # (B, L-1)
            targets = labels[:, 1:][predicts]  # (T,)
            logits = model.lm_head(hidden[predicts]).float()  # (T, V)
            loss = torch.nn.functional.cross_entropy(logits, targets)
            if config.ground_weight and grounds:
                ground_loss, ground_hits = grounding_loss(
                    seen.query, seen.key, adapter.attention_scale(attention), inputs, grounds, image_token_id
                )
                loss = loss + config.ground_weight * ground_loss.mean()
                for (*_, category, _), hit in zip(grounds, ground_hits.tolist(), strict=True):
                    window_hits.setdefault(f"ground_{category}", []).append(hit)
        features = captured.pop().pooler_output  # per image, or all images concatenated
        features = torch.cat(features) if isinstance(features, list | tuple) else features
        probe_loss, probe_hits = probe_loss_and_hits(probe(features), token_labels.to(device), config.image_size)
        loss = loss + config.probe_weight * probe_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

        with torch.no_grad():  # training accuracy: an answer is right when all its tokens are
            if not seeing_only:
                right = torch.zeros_like(predicts)
                right[predicts] = logits.argmax(-1) == targets
            for category, row, first_pos, last in answers:
                hit = bool(right[row, first_pos - 1 : last].all())
                window_hits.setdefault(category, []).append(hit)
            for name, hit in probe_hits.items():
                window_hits.setdefault(f"probe_{name}", []).extend(hit.tolist())
        window_loss += float(loss.detach()) * len(labels)
        window_n += len(labels)
        done = step + 1
        if done % log_every == 0 or done == config.steps:
            now = time.perf_counter()
            rate = window_n / (now - window_t)
            eta = (config.steps - done) * config.batch_size / rate
            accuracy = " ".join(f"{name}={sum(hits) / len(hits):.2f}" for name, hits in sorted(window_hits.items()))
            log(f"step {done}/{config.steps} loss {window_loss / window_n:.4f} train_acc {accuracy} "
                f"lr {config.lr_at(step):.2e} {rate:.1f} samples/s elapsed {elapsed_before + now - t0:.0f}s "
                f"eta {eta / 60:.1f} min")  # fmt: skip
            window_loss, window_n, window_t, window_hits = 0.0, 0, time.perf_counter(), {}
        if done % config.eval_every == 0 and config.encoder_steps < done < config.steps:
            log(f"step {done} val {_format(_evaluate(backbone, val_items, 32))}")
            window_t = time.perf_counter()  # evaluation time is not training throughput
        if time.perf_counter() - last_save >= save_every_s:
            _save_state(state_path, model, probe, optimizer, done, config, elapsed_before + time.perf_counter() - t0)
            last_save = time.perf_counter()
    train_s = elapsed_before + time.perf_counter() - t0
    hook.remove()

    model.eval()
    save_backbone(backbone, out)
    # Score what was written, through the loading path users take, so the recorded figures are the checkpoint's.
    from illava.backbones import load_backbone

    saved = load_backbone(str(out))
    saved.model.to(device)
    test_items = demo_split("test", final_items, image_size=config.image_size)
    test_choices = choose(saved, test_items, batch_size=32)
    summary = {
        "config": asdict(config),
        "spec": asdict(DEMO_SPEC),
        "parameters": params,
        "train_seconds": round(train_s, 1),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "val_accuracy": _evaluate(saved, demo_split("val", final_items, image_size=config.image_size), 32),
        "test_accuracy": accuracy_by_category(test_items, test_choices),
        "test_slice": {"items": len(test_items[:SLICE]), "accuracy": accuracy_by_category(test_items[:SLICE], test_choices[:SLICE])["all"],
                       "choices": "".join(test_choices[:SLICE])},
    }  # fmt: skip
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    state_path.unlink(missing_ok=True)
    log(f"test {_format(summary['test_accuracy'])}")
    log(f"wrote {out} in {train_s / 60:.1f} min of training")
    return summary


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="illava-tune train-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEMO_CHECKPOINT, help=f"checkpoint folder (default {DEMO_CHECKPOINT})"
    )
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--resume", action="store_true", help=f"continue from {STATE_FILE} in --out")
    parser.add_argument("--save-every-s", type=float, default=300.0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--device", default="cpu", help="cpu (the committed checkpoint) or cuda to try settings fast")
    parser.add_argument("--workers", type=int, default=0, help="processes preparing batches ahead (for --device cuda)")
    args = parser.parse_args(argv)
    config = TrainConfig(**{field: getattr(args, field) for field in asdict(defaults)})
    if config.steps < 1 or config.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1")
    if not 0 <= config.ground_layer < DEMO_SPEC.text_layers:
        parser.error(f"--ground-layer must be in 0..{DEMO_SPEC.text_layers - 1}")
    if config.ground_heads not in (1, 2, 3):
        parser.error("--ground-heads must be 1, 2 or 3")
    train(config, args.out, resume=args.resume, save_every_s=args.save_every_s, log_every=args.log_every, device=args.device, workers=args.workers,
          log=lambda line: print(line, flush=True))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
