"""The committed `demo` checkpoint: loads through `from_pretrained` on a folder, and still answers the
demo benchmark as well as it did when it was trained."""

import json

import pytest

import illava
from illava.backbones import DEMO_CHECKPOINT, load_backbone
from profiler.accuracy import accuracy_by_category, choose
from profiler.demo_vqa import demo_split

if not (DEMO_CHECKPOINT / "training.json").is_file():
    pytest.skip(f"no trained demo checkpoint in {DEMO_CHECKPOINT} (`illava-tune train-demo`)", allow_module_level=True)
RECORD = json.loads((DEMO_CHECKPOINT / "training.json").read_text())


@pytest.fixture(scope="module")
def demo():
    return load_backbone("demo")


@pytest.fixture(scope="module")
def slice_items():
    return demo_split("test", RECORD["test_slice"]["items"])


def test_the_checkpoint_is_small_complete_and_loads_from_its_folder(demo):
    files = {path.name: path.stat().st_size for path in DEMO_CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(files)
    assert sum(files.values()) <= 20 * 2**20
    assert demo.name == "demo" and demo.model.name_or_path == str(DEMO_CHECKPOINT)
    assert demo.model.config.vision_config.fullatt_block_indexes == [3, 7]  # windowed and full-attention blocks
    assert RECORD["test_accuracy"]["all"] >= 0.80


def test_accuracy_on_the_first_100_test_questions_matches_the_training_record(demo, slice_items):
    choices = "".join(choose(demo, slice_items, batch_size=25))
    recorded = RECORD["test_slice"]["choices"]
    # Other CPUs may round a near tie differently; anything beyond a couple of flips is a real change.
    assert sum(a != b for a, b in zip(choices, recorded, strict=True)) <= 2
    accuracy = accuracy_by_category(slice_items, list(choices))["all"]
    assert abs(accuracy - RECORD["test_slice"]["accuracy"]) <= 0.02


# Behind `slow` for the default run's 10 minutes (it scores 100 questions under four schedules, about 50 s);
# docs/benchmarks.md's table is the 500-question version of the same claim.
@pytest.mark.slow
def test_merging_costs_accuracy_and_in_the_llm_importance_beats_random_dropping(demo, slice_items):
    """What the 500-question table in docs/benchmarks.md establishes, checked on the 100-question slice:
    merging at 88.9% costs accuracy, and with the removal in the LLM, importance selection beats random
    selection (+16.6 points [12.7, 20.6] on 500 questions; 80% against 54% and 60% on this slice).
    The paper's split is not asserted against random: on 500 questions the two are level at 88.9%."""
    model = demo.model

    def accuracy(schedule) -> float:
        illava.apply(model, schedule)
        try:
            return accuracy_by_category(slice_items, choose(demo, slice_items, batch_size=25))["all"]
        finally:
            illava.remove(model)

    base = RECORD["test_slice"]["accuracy"]
    heavy = illava.paper_default_for(model, 8 / 9)
    assert accuracy(heavy) < base
    in_llm = heavy.with_(encoder_share=0.0)
    importance = accuracy(in_llm)
    dropped = [accuracy(in_llm.with_(method="random", seed=seed)) for seed in range(2)]
    assert importance < base
    assert importance > max(dropped) + 0.1
