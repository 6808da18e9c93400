import json

import pytest
import torch

from illava.backbones import load_backbone
from illava_tune.cli import main as cli_main
from illava_tune.train_demo import STATE_FILE, TrainConfig, train

# Steps 1-2 are the pointing curriculum (text only; step 1 with two options), 3-4 mixed with images.
CONFIG = TrainConfig(steps=4, batch_size=2, warmup_steps=2, eval_every=1000, eval_items=5, pointer_steps=2,
                     two_option_share=0.5)  # fmt: skip


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


def test_training_starts_with_text_only_pointing_then_adds_images():
    from illava.backbones import build_untrained
    from illava_tune.train_demo import _batch
    from profiler.measure import _letter_ids

    backbone = build_untrained("demo")
    tokenizer = backbone.tokenizer
    letters, end_id = _letter_ids(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = []
    for step in range(3):
        inputs, labels, kinds, token_labels = _batch(backbone, CONFIG, step, letters, end_id)
        prompts.append(tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True))
        if step < 2:
            assert "pixel_values" not in inputs and len(token_labels) == 0 and set(kinds) == {"match"}
            assert prompts[-1].startswith("user\nWhich option says ")
        else:
            assert inputs["pixel_values"].shape[0] > 0 and len(token_labels) > 0
    assert "\nB. " in prompts[0] and "\nC. " not in prompts[0]  # two options first
    assert "\nD. " in prompts[1]


def test_benchmark_form_questions_go_from_two_options_to_four():
    from illava_tune.train_demo import _choice_options

    config = TrainConfig(two_option_choice_steps=100)
    assert all(_choice_options(i, 0, config) == 2 for i in range(200))
    halfway = [_choice_options(i, 50, config) for i in range(400)]
    assert 0.4 < halfway.count(2) / len(halfway) < 0.6
    assert all(_choice_options(i, 100, config) == 4 for i in range(200))
    assert all(_choice_options(i, 0, TrainConfig(two_option_choice_steps=0)) == 4 for i in range(20))


def test_probe_labels_name_each_tokens_object_and_cell():
    from illava_tune.train_demo import TOKEN_PIXELS, _token_labels
    from profiler.demo_vqa import COLOURS, SHAPES, demo_scene

    scene = demo_scene("train", 7)
    labels = _token_labels(scene)
    cells = scene.image_size // TOKEN_PIXELS
    assert labels.shape == (cells * cells, 4)
    for obj in scene.objects:  # the cell under an object's centre is labelled with it
        x, y = obj.centre
        row, col = int(y) // TOKEN_PIXELS, int(x) // TOKEN_PIXELS
        token = labels[row * cells + col]
        if obj.size != "small":  # a small object may not cover most of any cell
            assert token[0] == list(COLOURS).index(obj.colour) + 1 and token[1] == SHAPES.index(obj.shape) + 1
        assert token[2] == row and token[3] == col
