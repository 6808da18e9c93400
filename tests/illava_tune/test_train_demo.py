import json

import pytest
import torch

from illava.backbones import load_backbone
from illava_tune.cli import main as cli_main
from illava_tune.train_demo import STATE_FILE, TrainConfig, train
from profiler.accuracy import answer_style

CONFIG = TrainConfig(steps=4, batch_size=2, warmup_steps=2, eval_every=1000, eval_items=5)


class _Crash(Exception):
    pass


def _weights(path):
    return load_backbone(str(path)).model.state_dict()


def test_training_writes_a_loadable_checkpoint_and_its_record(tmp_path):
    lines = []
    summary = train(CONFIG, tmp_path, log_every=1, log=lines.append, final_items=10)
    assert any(line.startswith("step 4/4 loss ") and "samples/s" in line and "eta" in line for line in lines)
    record = json.loads((tmp_path / "training.json").read_text())
    assert record == json.loads(json.dumps(summary))
    assert record["config"]["steps"] == 4 and record["test_slice"]["items"] == 10
    assert set(record["test_accuracy"]) >= {"all", "colour", "shape", "count", "position", "presence"}
    assert not (tmp_path / STATE_FILE).exists()  # the resumable state goes once the checkpoint is written
    backbone = load_backbone(str(tmp_path))
    assert answer_style(backbone.model) == "text"  # the checkpoint says it is scored by option text
    start = load_backbone("tiny")  # a different architecture: the checkpoint's config is what loads
    assert backbone.model.config.vision_config.depth == 8 != start.model.config.vision_config.depth


def test_a_crashed_run_resumes_to_the_same_weights(tmp_path):
    straight = tmp_path / "straight"
    train(CONFIG, straight, log_every=1, log=lambda line: None, final_items=5)

    def crash_at_step_3(line: str) -> None:
        if line.startswith("step 3/4"):
            raise _Crash

    crashed = tmp_path / "crashed"
    with pytest.raises(_Crash):
        train(CONFIG, crashed, save_every_s=0.0, log_every=1, log=crash_at_step_3, final_items=5)
    assert torch.load(crashed / STATE_FILE, weights_only=True)["step"] == 2
    lines = []
    train(CONFIG, crashed, resume=True, log_every=1, log=lines.append, final_items=5)
    assert lines[0] == "resuming at step 2/4"
    a, b = _weights(straight), _weights(crashed)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_resume_refuses_other_settings_and_a_missing_state(tmp_path):
    with pytest.raises(FileNotFoundError, match="no train_state.pt"):
        train(CONFIG, tmp_path, resume=True, final_items=5)
    with pytest.raises(_Crash):
        train(CONFIG, tmp_path, save_every_s=0.0, log_every=1, final_items=5,
              log=lambda line: (_ for _ in ()).throw(_Crash) if line.startswith("step 2/") else None)  # fmt: skip
    with pytest.raises(ValueError, match="other settings"):
        train(TrainConfig(steps=5, batch_size=2), tmp_path, resume=True, final_items=5)


def test_cli_passes_options_through_and_rejects_bad_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train-demo", "--out", str(tmp_path), "--steps", "0"])
    assert exit_info.value.code == 2 and "--steps and --batch-size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["jobs", "--steps", "3"])
    assert "unrecognized arguments: --steps 3" in capsys.readouterr().err


def _true_answer(scene, item) -> str:
    """The answer to a training question, worked out from the scene's objects (not from the item)."""
    from illava_tune.train_demo import _direction

    objects, words = scene.objects, item.question.rstrip("?").split()
    if item.category == "colour":
        return next(o.colour for o in objects if o.shape == words[-1])
    if item.category == "shape":
        return next(o.shape for o in objects if o.colour == words[-2])
    if item.category == "count":
        return str(sum(words[2] in (o.colour, o.shape + "s") for o in objects))
    if item.category == "position":
        names = {o.name: o for o in objects}
        target, reference = item.question[len("Where is the ") : -1].split(" relative to the ")
        return _direction(names[target], names[reference], scene.image_size)
    present = [text for text in item.options.values() if text in {o.name for o in objects}]
    assert len(present) == 1  # one option is in the scene, the three look-alikes are not
    return present[0]


def test_a_conversation_asks_the_benchmark_question_first_then_one_of_each_other_type():
    from illava_tune.train_demo import _conversation
    from profiler.demo_vqa import CATEGORIES, demo_scene

    seen = set()
    for index in range(40):
        scene = demo_scene("train", index)
        items = _conversation(scene, 5)
        first = scene.item()
        assert (items[0].question, items[0].options, items[0].answer) == (first.question, first.options, first.answer)
        assert len(items[0].images) == 1 and all(not item.images for item in items[1:])
        others = [item.category for item in items[1:]]
        assert scene.category not in others and len(set(others)) == len(others)
        for item in items[1:]:
            assert item.options[item.answer] == _true_answer(scene, item), item.question
            assert len(item.options) == 4
        seen.update(others)
        assert len(_conversation(scene, 2)) <= 2
    assert seen == set(CATEGORIES)


def test_the_labels_are_exactly_the_answers_and_their_end_of_turn():
    from illava.backbones import build_untrained
    from illava_tune.train_demo import _batch, _conversation
    from profiler.demo_vqa import demo_scene

    backbone = build_untrained("demo")
    config = TrainConfig(batch_size=3)
    inputs, labels, answers, token_labels = _batch(backbone, config, 2)
    assert inputs["pixel_values"].shape[0] > 0 and token_labels.shape == (3 * 64, 4)
    expected = [item for i in range(6, 9) for item in _conversation(demo_scene("train", i), config.turns)]
    assert [category for category, *_ in answers] == [item.category for item in expected]
    decoded = [backbone.tokenizer.decode(labels[row, first : last + 1]) for _, row, first, last in answers]
    assert decoded == [item.options[item.answer] + "<|im_end|>" for item in expected]
    assert int((labels != -100).sum()) == sum(last - first + 1 for _, _, first, last in answers)


def test_probe_labels_name_each_tokens_object_and_cell():
    from illava_tune.train_demo import TOKEN_PIXELS, _token_labels
    from profiler.demo_vqa import COLOURS, SHAPES, demo_scene

    for index in range(7, 12):
        scene = demo_scene("train", index)
        labels = _token_labels(scene)
        cells = scene.image_size // TOKEN_PIXELS
        assert labels.shape == (cells * cells, 4)
        centres = {}
        for obj in scene.objects:
            x, y = obj.centre
            centres.setdefault(int(y) // TOKEN_PIXELS * cells + int(x) // TOKEN_PIXELS, []).append(obj)
        for cell, objects in centres.items():
            token = labels[cell]
            if len(objects) == 1:  # the cell under an object's centre names its shape
                assert token[1] == SHAPES.index(objects[0].shape) + 1
                if objects[0].size != "small":  # a small object may not cover most of any cell
                    assert token[0] == list(COLOURS).index(objects[0].colour) + 1
            assert token[2] == cell // cells and token[3] == cell % cells
        # shape is scored only at object centres
        assert all(int(labels[i, 1]) == -100 for i in range(cells * cells) if i not in centres)
