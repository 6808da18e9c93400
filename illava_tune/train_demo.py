"""Train the `demo` backbone on the demo VQA benchmark: `illava-tune train-demo`.

The architecture is `illava.backbones.DEMO_SPEC` (a real Qwen2.5-VL: windowed and full-attention vision
blocks, 2x2 patch merger, GQA, 3-D mRoPE), initialised with seeded weights and trained from scratch on
the `train` stream of `profiler.demo_vqa` (item i of step s is item s*batch+i, so a run is a function of
its seed and settings). The loss is cross-entropy on the answer tokens and the ``<|im_end|>`` after
them, at the positions `generate` would produce them, plus a training-only linear probe on the image
tokens the encoder hands the LLM that names the colour and shape under each token and the token's row
and column (it teaches the encoder to see and to say where; it is not saved).

A four-option answer takes two skills: seeing the answer, and pointing at the option letter that
says it. The letter alone teaches neither (runs with choices only sat at chance). Pointing is learned
late and abruptly by this small LLM, if at all: with four options not in 400 steps even as a
text-only task; with two options it was learned within 250-300 steps in some runs and not in
others (docs/benchmarks.md, "Status of the demo backbone"). So training starts with `pointer_steps`
of text-only "Which option says X?" questions, two options for the first `two_option_share` of them
and four after, and then mixes four forms in equal shares: listing the objects, open-ended
questions answered in words, text-only matching, and the benchmark's own form (with the profiler's
exact prompt), whose questions show two options at first and four after `two_option_choice_steps`.
No run of this recipe has yet answered the benchmark's form above chance (issue 5 is open).

The run prints a progress line every `--log-every` steps (loss, training accuracy, samples/s, ETA) and
the validation accuracy per question type every `--eval-every` steps. It saves a resumable state
(`train_state.pt`: weights, optimizer, step) every `--save-every-s` seconds, written atomically; `--resume`
continues from it. At the end it writes the checkpoint (safetensors, config, tokenizer, image
processor, generation config) and ``training.json`` with the settings, time taken and accuracy on the
validation split, the test split and the test split's first 100 questions (the figure
`tests/illava/test_demo_backbone.py` checks the committed checkpoint against).

Same seed and settings on the same machine and thread count give the same weights; other CPUs can
differ in the last bits of a float sum, and so in the weights after training.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from illava.backbones import DEMO_CHECKPOINT, DEMO_SPEC, Backbone, build_untrained, save_backbone
from illava.inputs import IMAGE_MARKER, Sample, build_inputs
from profiler.accuracy import accuracy_by_category, choose
from profiler.datasets import MCQItem
from profiler.demo_vqa import COLOURS, DEFAULT_IMAGE_SIZE, SHAPES, demo_scene, demo_split
from profiler.measure import _letter_ids

STATE_FILE = "train_state.pt"
SLICE = 100  # test questions the committed checkpoint's test re-scores


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2400
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 150
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    image_size: int = DEFAULT_IMAGE_SIZE
    eval_every: int = 200
    eval_items: int = 250
    probe_weight: float = 1.0
    pointer_steps: int = 400  # the first steps: text-only "which option says X?" (see _question_form)
    two_option_share: float = 0.75  # of those, the first share with two options instead of four
    two_option_choice_steps: int = 600  # mixed steps over which benchmark-form questions go from 2 options to 4

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


OPEN_INSTRUCTION = "Answer with a single word."
LIST_PROMPT = "List the objects in the image."


def _question_form(index: int, category: str) -> str:
    """How training question `index` is asked, in equal shares: ``list`` (every object named, in a
    fixed colour then shape order), ``open`` (no options, answered in words), ``match`` (text only:
    "Which option says X?", the letter of the option that matches) and ``choice`` (the benchmark's own
    form, which also takes the open slots of presence questions). A choice is two skills at once,
    seeing the answer and pointing at its letter; alone, the letter teaches neither: runs with choices
    only, or with choices and open questions, sat at chance for 500-1400 steps. The other forms teach
    each skill directly."""
    slot = index % 8
    if slot in (0, 4):
        return "list"
    if slot in (1, 5):
        return "match"
    if slot in (2, 6) and category != "presence":  # presence questions need their options
        return "open"
    return "choice"


def _listing(scene) -> str:
    order = {colour: i for i, colour in enumerate(COLOURS)} | {shape: i for i, shape in enumerate(SHAPES)}
    return ", ".join(o.name for o in sorted(scene.objects, key=lambda o: (order[o.colour], order[o.shape])))


def _choice_options(index: int, mixed_step: int, config: TrainConfig) -> int:
    """How many options benchmark-form question `index` shows at `mixed_step` (steps since the pointing
    curriculum): two for all of them at first, then for a share falling linearly to none after
    `two_option_choice_steps`; which questions keep two is a fixed pseudo-random function of the index."""
    share_two = 1.0 - mixed_step / config.two_option_choice_steps if config.two_option_choice_steps > 0 else 0.0
    return 2 if (index * 0.6180339887) % 1.0 < share_two else 4


def _two_options(item: MCQItem, right_first: bool) -> MCQItem:
    """The item with only its right option and one other, the right one first or second."""
    right = item.options[item.answer]
    other = next(text for letter, text in item.options.items() if letter != item.answer)
    options, answer = ({"A": right, "B": other}, "A") if right_first else ({"A": other, "B": right}, "B")
    return dataclasses.replace(item, options=options, answer=answer)


def _example(
    scene, tokenizer, letters: dict[str, int], end_id: int, phase: str = "mixed", options: int = 4
) -> tuple[Sample, list[int], str]:
    """The prompt, the tokens the model should answer with (then <|im_end|>), and the form it is asked
    in (``list``, ``open``, ``match`` or ``choice``; the last two are answered with an option letter).
    `phase`: ``mixed`` (the forms of _question_form), or the pointing curriculum that comes first,
    ``match2`` / ``match4`` (text-only matching with two / four options). `options`: how many options
    a ``choice`` question shows (2 or 4)."""
    item = scene.item()
    kind = _question_form(scene.index, scene.category) if phase == "mixed" else "match"
    if phase == "match2" or (kind == "choice" and options == 2):
        # Which option is right alternates: by index for matching; for choices by index // 8, since
        # choice slots of _question_form are all odd (by index they would always put the answer second).
        item = _two_options(item, right_first=(scene.index if phase == "match2" else scene.index // 8) % 2 == 0)
    if kind == "choice":
        return item.to_sample(), [letters[item.answer], end_id], kind
    if kind == "match":
        question = f"Which option says {item.options[item.answer]}?"
        text = MCQItem(item.index, question, item.options, item.answer, ()).prompt()
        return Sample(text), [letters[item.answer], end_id], kind
    text, answer = (f"{scene.question}\n{OPEN_INSTRUCTION}", item.options[item.answer]) if kind == "open" else (
        LIST_PROMPT, _listing(scene))  # fmt: skip
    sample = Sample(f"{IMAGE_MARKER}\n{text}", list(item.images))
    return sample, [*tokenizer.encode(answer, add_special_tokens=False), end_id], kind


TOKEN_PIXELS = 28  # one LLM image token is a 2x2 group of 14-pixel patches


def _token_labels(scene) -> torch.Tensor:
    """(tokens, 4): colour and shape class (0 = background) of the object covering most of each
    28x28 cell, and the cell's row and column, in the raster order image tokens reach the LLM."""
    cells = scene.image_size // TOKEN_PIXELS
    labels = torch.zeros(cells * cells, 4, dtype=torch.long)
    labels[:, 2] = torch.arange(cells * cells) // cells
    labels[:, 3] = torch.arange(cells * cells) % cells
    colour_class = {colour: i + 1 for i, colour in enumerate(COLOURS)}
    shape_class = {shape: i + 1 for i, shape in enumerate(SHAPES)}
    for row in range(cells):
        for col in range(cells):
            x0, y0 = col * TOKEN_PIXELS, row * TOKEN_PIXELS
            best, best_area = None, 0
            for obj in scene.objects:
                bx0, by0, bx1, by1 = obj.box
                w = min(bx1, x0 + TOKEN_PIXELS - 1) - max(bx0, x0) + 1
                h = min(by1, y0 + TOKEN_PIXELS - 1) - max(by0, y0) + 1
                if w > 0 and h > 0 and w * h > best_area:
                    best, best_area = obj, w * h
            if best is not None:
                labels[row * cells + col, :2] = torch.tensor([colour_class[best.colour], shape_class[best.shape]])
    return labels


PROBE_TARGETS = ("colour", "shape", "row", "column")
POSITION_WEIGHT = 0.5  # of each of the row and column terms, relative to colour and shape


def _probe_sizes(image_size: int) -> tuple[int, ...]:
    """Classes of each PROBE_TARGETS head: colours and shapes with background (0), rows, columns."""
    cells = image_size // TOKEN_PIXELS
    return len(COLOURS) + 1, len(SHAPES) + 1, cells, cells


def _probe_loss_and_hits(probe_logits: torch.Tensor, token_labels: torch.Tensor, image_size: int):
    """The probe's loss and, per PROBE_TARGETS, which image tokens that hold an object it names right.

    Colour and shape are over all tokens, background down-weighted (most cells are background); row
    and column only over tokens on an object: the encoder has no absolute position embedding (its
    rotary positions are relative), so this is what makes it say where an object is, which relative
    position questions need."""
    heads = torch.split(probe_logits, _probe_sizes(image_size), dim=-1)
    on_object = token_labels[:, 0] > 0
    loss = probe_logits.new_zeros(())
    for i, head in enumerate(heads[:2]):
        weight = torch.ones(head.shape[-1], device=head.device)
        weight[0] = 0.1
        loss = loss + torch.nn.functional.cross_entropy(head, token_labels[:, i], weight=weight)
    if on_object.any():
        for i, head in enumerate(heads[2:], start=2):
            loss = loss + POSITION_WEIGHT * torch.nn.functional.cross_entropy(
                head[on_object], token_labels[on_object, i]
            )
    hits = {
        name: head[on_object].argmax(-1) == token_labels[on_object, i]
        for i, (name, head) in enumerate(zip(PROBE_TARGETS, heads))
    }
    return loss, hits


def _batch(backbone: Backbone, config: TrainConfig, step: int, letters: dict[str, int], end_id: int):
    """Inputs of step `step` with each answer appended, the labels of the last K positions, each row's
    form (see _example) and the probe's labels of the image tokens (see _token_labels).

    Rows are left padded as a whole (prompt + answer), so every answer ends at the last position;
    labels (B, K) hold row i's answer in its last len(answer_i) columns and -100 elsewhere.
    """
    tokenizer = backbone.tokenizer
    first = step * config.batch_size
    scenes = [demo_scene("train", first + i, image_size=config.image_size) for i in range(config.batch_size)]
    if step < config.pointer_steps:
        phase = "match2" if step < config.pointer_steps * config.two_option_share else "match4"
    else:
        phase = "mixed"
    mixed_step = step - config.pointer_steps
    examples = [
        _example(scene, tokenizer, letters, end_id, phase, _choice_options(scene.index, mixed_step, config))
        for scene in scenes
    ]
    inputs = build_inputs(tokenizer, backbone.image_processor, [sample for sample, _, _ in examples])
    answers = [answer for _, answer, _ in examples]
    width = max(len(a) for a in answers)
    mask = inputs["attention_mask"].bool()
    rows = {key: [] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for i, answer in enumerate(answers):
        ids = inputs["input_ids"][i][mask[i]].tolist() + answer
        types = inputs["mm_token_type_ids"][i][mask[i]].tolist() + [0] * len(answer)
        rows["input_ids"].append(ids)
        rows["mm_token_type_ids"].append(types)
        rows["attention_mask"].append([1] * len(ids))
    length = max(len(r) for r in rows["input_ids"])
    pad = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0}
    for key, values in rows.items():
        inputs[key] = torch.tensor([[pad[key]] * (length - len(r)) + r for r in values])  # (B, L)
    labels = torch.tensor([[-100] * (width - len(a)) + a for a in answers])  # (B, K)
    kinds = [kind for _, _, kind in examples]
    with_image = [scene for scene, (sample, _, _) in zip(scenes, examples) if sample.images]
    token_labels = [_token_labels(scene) for scene in with_image]
    return inputs, labels, kinds, torch.cat(token_labels) if token_labels else torch.zeros(0, 4, dtype=torch.long)


def _batches(backbone: Backbone, config: TrainConfig, steps: range, letters, end_id: int, workers: int):
    """The batches of `steps` in order; with `workers` > 0 prepared ahead in that many processes (for a
    GPU, where drawing and preprocessing would otherwise starve it; on 2 CPU cores they only compete)."""
    if workers <= 0:
        yield from (_batch(backbone, config, step, letters, end_id) for step in steps)
        return
    import multiprocessing
    from functools import partial

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(partial(_batch_for_worker, config, letters, end_id), steps, chunksize=1)


def _batch_for_worker(config: TrainConfig, letters, end_id: int, step: int):
    torch.set_num_threads(1)
    return _batch(_worker_backbone(), config, step, letters, end_id)


@functools.lru_cache(maxsize=1)
def _worker_backbone() -> Backbone:
    """Tokenizer and image processor for a worker process (the model stays in the trainer)."""
    from illava.backbones import build_image_processor, build_tokenizer

    return Backbone(model=None, tokenizer=build_tokenizer(), image_processor=build_image_processor(), name="demo")


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


def train(config: TrainConfig, out: Path, *, resume: bool = False, save_every_s: float = 300.0,
          log_every: int = 25, log=print, final_items: int | None = None, device: str = "cpu",
          workers: int = 0) -> dict:  # fmt: skip
    """Train, write the checkpoint and training.json into `out`, return the summary written.

    `final_items` limits the final validation and test scoring to that many questions (tests use it;
    the recorded figures of the committed checkpoint are on the whole splits)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    backbone = build_untrained("demo", seed=config.seed)
    model = backbone.model.to(device).train()
    # A linear probe on the image tokens the encoder hands the LLM, trained to name the colour and
    # shape under each token and where the token is: dense supervision that teaches the encoder to see
    # in hundreds of steps instead of the thousands a 4-way letter needs. Training only; the checkpoint
    # does not hold it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        probe = torch.nn.Linear(DEMO_SPEC.text_hidden, sum(_probe_sizes(config.image_size))).to(device)
    captured: list = []
    hook = model.model.visual.register_forward_hook(lambda module, args, output: captured.append(output))
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
        if state["config"] != asdict(config):
            raise ValueError(f"--resume: {state_path} was written with other settings: {state['config']}")
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed_before = state["step"], state["elapsed_s"]
        log(f"resuming at step {start}/{config.steps}")
    letters = _letter_ids(backbone.tokenizer)
    end_id = backbone.tokenizer.convert_tokens_to_ids("<|im_end|>")
    val_items = demo_split("val", config.eval_items, image_size=config.image_size)
    params = sum(p.numel() for p in model.parameters())
    log(f"training demo: {params:,} parameters, {config.steps} steps of {config.batch_size}, "
        f"{torch.get_num_threads()} threads")  # fmt: skip

    t0, last_save = time.perf_counter(), time.perf_counter()
    window_loss, window_n, window_t, window_hits = 0.0, 0, time.perf_counter(), {}
    option_ids = torch.tensor([letters[k] for k in "ABCD"], device=device)
    for step, (inputs, labels, kinds, token_labels) in zip(
        range(start, config.steps), _batches(backbone, config, range(start, config.steps), letters, end_id, workers)
    ):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        inputs, labels = inputs.to(device), labels.to(device)
        width = labels.shape[1]
        captured.clear()  # evaluation runs the encoder too
        logits = model(**inputs, logits_to_keep=width + 1, use_cache=False).logits[:, :width].float()  # (B, K, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        probe_hits = {}
        if len(token_labels):  # the pointing curriculum has no images
            features = captured.pop().pooler_output  # per image, or all images concatenated
            features = torch.cat(features) if isinstance(features, list | tuple) else features
            probe_loss, probe_hits = _probe_loss_and_hits(probe(features), token_labels.to(device), config.image_size)
            loss = loss + config.probe_weight * probe_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

        with torch.no_grad():  # training accuracy of the letter answers, by form, and of the probe
            letter_rows = torch.tensor([kind in ("match", "choice") for kind in kinds], device=device)
            # the letter is second to last
            picked = option_ids[logits[letter_rows, width - 2][:, option_ids].argmax(-1)]
            right = (picked == labels[letter_rows, width - 2]).tolist()
            for kind, hit in zip([k for k in kinds if k in ("match", "choice")], right):
                window_hits.setdefault(kind, []).append(hit)
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
        if done % config.eval_every == 0 and done < config.steps:
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
    train(config, args.out, resume=args.resume, save_every_s=args.save_every_s, log_every=args.log_every, device=args.device, workers=args.workers,
          log=lambda line: print(line, flush=True))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
