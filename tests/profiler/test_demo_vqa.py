import collections

import pytest

from profiler import read_dataset, resolve_workload
from profiler.demo_vqa import (
    CATEGORIES,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    demo_item,
    demo_scene,
    demo_split,
    fingerprint,
)
from profiler.workload import default_workload, load_workload

# The test split's bytes (questions, options, answers, pixels). It changes only if the generator or
# Pillow's rasteriser changes; then every accuracy figure recorded on the split is void: re-measure.
TEST_SPLIT_SHA256 = "7954c2330d6be9d0c085c3417dddf3f7517b1e52c264d4c7d5e8e4f032ec99d7"


def test_test_split_is_500_balanced_questions_with_pinned_bytes():
    items = demo_split("test")
    assert len(items) == 500
    assert collections.Counter(item.category for item in items) == {c: 100 for c in CATEGORIES}
    assert fingerprint(items) == TEST_SPLIT_SHA256
    answers = collections.Counter(item.answer for item in items)
    assert set(answers) == set("ABCD") and min(answers.values()) >= 90  # no letter bias to exploit


def test_splits_are_disjoint_streams_and_items_depend_only_on_their_index():
    assert fingerprint(demo_split("test", 5, start=20)) == fingerprint(demo_split("test")[20:25])
    test = {item.images[0].tobytes() for item in demo_split("test", 50)}
    val = {item.images[0].tobytes() for item in demo_split("val", 50)}
    train = {item.images[0].tobytes() for item in demo_split("train", 50)}
    assert not test & val and not test & train and not val & train


def _answer_text(scene) -> str:
    return scene.options[scene.answer]


@pytest.mark.parametrize("index", range(100))
def test_every_answer_follows_from_the_scene(index):
    scene = demo_scene("test", index)
    objects = scene.objects
    assert len(scene.options) == 4 and len(set(scene.options.values())) == 4
    assert len({(o.shape, o.colour) for o in objects}) == len(objects), "colour-shape pairs name one object each"
    for a in objects:  # no two objects touch
        for b in objects:
            if a is not b:
                assert a.box[2] < b.box[0] or b.box[2] < a.box[0] or a.box[3] < b.box[1] or b.box[3] < a.box[1]
    question, answer = scene.question, _answer_text(scene)
    if scene.category == "colour":
        shape = question.removeprefix("What colour is the ").removesuffix("?")
        (target,) = [o for o in objects if o.shape == shape]
        assert answer == target.colour and set(scene.options.values()) <= set(COLOURS)
    elif scene.category == "shape":
        colour = question.removeprefix("What shape is the ").removesuffix(" object?")
        (target,) = [o for o in objects if o.colour == colour]
        assert answer == target.shape and set(scene.options.values()) == set(SHAPES)
    elif scene.category == "count":
        what = question.removeprefix("How many ").removesuffix(" are there?")
        if what.endswith(" objects"):
            count = sum(o.colour == what.removesuffix(" objects") for o in objects)
        else:
            count = sum(o.shape == what.removesuffix("s") for o in objects)
        assert answer == str(count) and set(scene.options.values()) == {"0", "1", "2", "3"}
    elif scene.category == "position":
        names = question.removeprefix("Where is the ").removesuffix("?").split(" relative to the ")
        (target,), (reference,) = ([o for o in objects if o.name == n] for n in names)
        dx = target.centre[0] - reference.centre[0]
        dy = target.centre[1] - reference.centre[1]
        expected = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        assert answer == expected and set(scene.options.values()) == set(DIRECTIONS)
        assert max(abs(dx), abs(dy)) >= 2 * min(abs(dx), abs(dy)) - 1, "the other axis must not compete"
    else:
        present = {o.name for o in objects}
        assert [text in present for text in scene.options.values()].count(True) == 1
        assert answer in present


@pytest.mark.parametrize("index", range(50))
def test_objects_are_drawn_where_the_scene_says(index):
    scene = demo_scene("val", index)
    image = scene.item().images[0]
    for obj in scene.objects:
        x, y = (round(v) for v in obj.centre)
        assert image.getpixel((x, y)) == COLOURS[obj.colour], obj


def test_a_third_of_objects_are_small():
    sizes = collections.Counter(o.size for i in range(200) for o in demo_scene("test", i).objects)
    assert 0.25 < sizes["small"] / sum(sizes.values()) < 0.45
    assert all(max(o.box[2] - o.box[0], o.box[3] - o.box[1]) < 28 for i in range(50) for o in demo_scene("test", i).objects
               if o.size == "small")  # fmt: skip


def test_builtin_dataset_names_and_the_demo_workload(tmp_path):
    assert fingerprint(read_dataset("demo", limit=3)) == fingerprint(demo_split("test", 3))
    assert fingerprint(read_dataset("demo:val", limit=2)) == fingerprint(demo_split("val", 2))
    assert len(read_dataset("demo:test")) == 500
    workload = resolve_workload(default_workload("demo"))
    assert workload.dataset == "demo" and not workload.synthetic
    assert default_workload("small") == "single-448"
    path = tmp_path / "w.yaml"
    path.write_text("dataset: demo\nsamples: 10\n")
    assert load_workload(path).dataset == "demo"  # a built-in name is not taken for a relative path


def test_bad_requests_say_what_is_allowed():
    with pytest.raises(ValueError, match="unknown demo split 'dev'"):
        demo_split("dev", 3)
    with pytest.raises(ValueError, match="unbounded"):
        demo_split("train")
    with pytest.raises(ValueError, match="has 500 items"):
        demo_split("test", 10, start=495)
    with pytest.raises(ValueError, match="image_size"):
        demo_item("test", 0, image_size=56)
