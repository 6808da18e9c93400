import dataclasses
import json

import pytest

from illava.inputs import IMAGE_MARKER, VIDEO_MARKER
from profiler.workload import (
    DEFAULT_PRESET,
    PRESETS,
    Workload,
    WorkloadError,
    batches,
    load_workload,
    resolve_workload,
    save_workload,
    synthetic_samples,
)


def test_presets_resolve_by_name_and_default_is_single_448():
    assert resolve_workload(None) is PRESETS["single-448"] and DEFAULT_PRESET == "single-448"
    for name, workload in PRESETS.items():
        assert resolve_workload(name) == workload and workload.name == name
    assert PRESETS["multi-4x448"].images_per_sample == 4
    video = PRESETS["video-16"]
    assert (video.images_per_sample, video.video_frames, video.video_size) == (0, 16, (336, 336))
    assert PRESETS["single-896"].image_size == (896, 896)


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_files_round_trip(tmp_path, suffix):
    workload = Workload(name="mine", images_per_sample=2, image_size=(224, 448), batch_size=3, samples=5, seed=7)
    path = save_workload(workload, tmp_path / f"w{suffix}")
    assert load_workload(path) == workload
    assert resolve_workload(str(path)) == workload and resolve_workload(path) == workload
    assert Workload.from_dict(json.loads(json.dumps(workload.to_dict()))) == workload


def test_hand_written_yaml_takes_defaults_name_from_stem_and_dataset_relative_to_file(tmp_path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "mmstar-small.yaml"
    path.write_text("dataset: data/mmstar.tsv\nsamples: 50\nimage_size: 224\n")
    workload = load_workload(path)
    assert workload.name == "mmstar-small" and workload.samples == 50 and workload.image_size == (224, 224)
    assert workload.dataset == str(tmp_path / "cfg" / "data" / "mmstar.tsv")
    assert not workload.synthetic and workload.batch_size == 1


def test_unknown_name_lists_presets():
    with pytest.raises(
        WorkloadError, match=r"unknown workload 'single-999'.*presets are \['demo-vqa', 'multi-4x448', 'single-448'"
    ):
        resolve_workload("single-999")


def test_missing_file_and_bad_extension(tmp_path):
    with pytest.raises(WorkloadError, match="no such workload file"):
        resolve_workload(tmp_path / "nope.yaml")
    (tmp_path / "w.toml").write_text("x = 1")
    with pytest.raises(WorkloadError, match=r"must end in one of \['.json', '.yaml', '.yml'\]"):
        load_workload(tmp_path / "w.toml")


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(
        WorkloadError, match=r"unknown workload keys \['batchsize', 'imgs'\]; allowed keys are \['name'"
    ):
        Workload.from_dict({"name": "x", "batchsize": 2, "imgs": 1})
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"image_sise": [448, 448]}))
    with pytest.raises(WorkloadError, match=r"typo.json: unknown workload keys \['image_sise'\]"):
        load_workload(path)


def test_file_that_is_not_a_mapping_or_not_parseable(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(WorkloadError, match="must hold a mapping of field names, got list"):
        load_workload(tmp_path / "list.yaml")
    (tmp_path / "bad.json").write_text("{name: ")
    with pytest.raises(WorkloadError, match="bad.json: not valid JSON"):
        load_workload(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"image_size": (450.0, 448)},
            r"image_size must be \(width, height\), each a positive integer.*got \(450.0, 448\)",
        ),
        ({"video_size": (0, 28)}, r"video_size must be .*positive integer.*got \(0, 28\)"),
        ({"image_size": (448,)}, r"image_size must be \(width, height\).*got \(448,\)"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
        ({"batch_size": "2"}, r"batch_size must be an integer >= 1, got '2'"),
        ({"samples": True}, r"samples must be an integer >= 1, got True"),
        ({"output_tokens": 0}, r"output_tokens must be an integer >= 1, got 0"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"images_per_sample": -1}, r"images_per_sample must be an integer >= 0, got -1"),
        ({"images_per_sample": 0}, r"images_per_sample must be at least 1 when video_frames is 0"),
        ({"dataset": "d.tsv", "video_frames": 8}, r"video_frames must be 0 when a dataset is given.*got 8"),
        ({"name": ""}, r"workload name must be a non-empty string"),
    ],
)
def test_invalid_values_name_field_value_and_what_is_allowed(changes, message):
    with pytest.raises(WorkloadError, match=message):
        dataclasses.replace(Workload(name="w"), **changes)


def test_dataset_workload_needs_no_synthetic_visuals_but_has_no_synthetic_samples():
    workload = Workload(name="d", images_per_sample=0, dataset="x.tsv")
    with pytest.raises(WorkloadError, match="reads its samples from the dataset 'x.tsv'"):
        synthetic_samples(workload)


def test_synthetic_samples_are_deterministic_and_shaped_by_the_workload():
    workload = Workload(name="w", images_per_sample=2, image_size=(56, 84), prompt_words=10, samples=3, seed=4)
    samples = synthetic_samples(workload)
    again = synthetic_samples(workload)
    assert len(samples) == 3
    for sample, other in zip(samples, again, strict=True):
        sample.validate()
        assert sample.text == other.text and sample.text.count(IMAGE_MARKER) == 2
        assert [im.size for im in sample.images] == [(56, 84)] * 2
        assert [im.tobytes() for im in sample.images] == [im.tobytes() for im in other.images]
        assert len(sample.text.replace(IMAGE_MARKER, "").split()) == 10
    assert len({s.text for s in samples}) == 3  # samples differ from each other
    assert samples[0].images[0].tobytes() != samples[0].images[1].tobytes()
    # a longer workload extends a shorter one; another seed changes it
    assert synthetic_samples(dataclasses.replace(workload, samples=4))[2].text == samples[2].text
    assert synthetic_samples(dataclasses.replace(workload, seed=5))[0].text != samples[0].text


def test_synthetic_video_samples():
    workload = Workload(
        name="v", images_per_sample=1, image_size=(28, 28), video_frames=3, video_size=(56, 28), samples=2
    )
    for sample in synthetic_samples(workload):
        sample.validate()
        assert sample.text.startswith(IMAGE_MARKER + VIDEO_MARKER)
        assert len(sample.videos) == 1 and [f.size for f in sample.videos[0]] == [(56, 28)] * 3


def test_batches():
    assert list(batches(range(5), 2)) == [[0, 1], [2, 3], [4]]
    assert list(batches([], 3)) == []
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        list(batches([1], 0))


@pytest.mark.parametrize(
    ("multiple", "workload", "message"),
    [
        (
            28,
            Workload(name="w", image_size=(450, 448)),
            r"image_size must be .*a multiple of 28 pixels on b.*nearest: \[448\]",
        ),
        (32, PRESETS["video-16"], r"video_size must be .*a multiple of 32 pixels on b .*\[320\].*got \(336, 336\)"),
    ],
)
def test_sizes_must_fit_the_backbone(multiple, workload, message):
    with pytest.raises(WorkloadError, match=message):
        workload.check_fits(multiple, "b")


def test_fitting_sizes_and_datasets_pass():
    PRESETS["single-448"].check_fits(28, "tiny")
    PRESETS["single-448"].check_fits(32, "tiny-qwen3-vl")
    PRESETS["demo-vqa"].check_fits(32, "any")  # dataset rows go through the processor as they are
    Workload(name="w", image_size=(450, 448)).check_fits(1, "tiny-llava-onevision")  # tiles: any size


def test_presets_give_the_documented_token_counts_through_the_real_processor():
    """Sizes that are multiples of 28 pass the image processor unchanged: (w/28)*(h/28) LLM tokens per image."""
    from illava.backbones import load_backbone
    from illava.inputs import IMAGE_TYPE, VIDEO_TYPE, build_inputs

    backbone = load_backbone("tiny")
    expected = {"single-448": 256, "single-896": 1024, "multi-4x448": 4 * 256, "video-16": 8 * 144}
    for name, tokens in expected.items():
        sample = synthetic_samples(dataclasses.replace(PRESETS[name], samples=1))[0]
        types = build_inputs(backbone, [sample])["mm_token_type_ids"]
        assert int(((types == IMAGE_TYPE) | (types == VIDEO_TYPE)).sum()) == tokens, name
