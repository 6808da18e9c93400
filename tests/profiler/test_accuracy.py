"""Option-text scoring (``answer="text"`` / ``score="options"``) against a per-sequence reference."""

import dataclasses

import pytest
import torch

from illava.backbones import load_backbone, save_backbone
from illava.inputs import build_inputs
from profiler import Profiler, resolve_workload
from profiler.accuracy import answer_logprob, answer_style, choose, end_of_turn, option_inputs
from profiler.demo_vqa import demo_split
from profiler.items import TEXT_ANSWER_INSTRUCTION


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny")


@pytest.fixture(scope="module")
def items():
    return demo_split("val", 5)


@torch.inference_mode()
def _alone(backbone, item, text) -> float:
    """Log-likelihood of `text` + end of turn after the item's prompt, one unpadded sequence."""
    tokenizer = backbone.tokenizer
    inputs = build_inputs(backbone, [item.to_sample("text")])
    answer = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.convert_tokens_to_ids(end_of_turn(backbone))]
    n = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.cat(
        [inputs["mm_token_type_ids"], torch.zeros(1, len(answer), dtype=torch.long)], dim=1
    )
    logp = backbone.model(**inputs, use_cache=False).logits[0].float().log_softmax(-1)
    return sum(float(logp[n - 1 + i, token]) for i, token in enumerate(answer))


def test_batched_option_scores_equal_each_sequence_scored_alone(backbone, items):
    inputs, labels, counts = option_inputs(backbone, items)
    assert counts == [4] * len(items) and inputs["input_ids"].shape[0] == 4 * len(items)
    with torch.inference_mode():
        logits = backbone.model(**inputs, logits_to_keep=labels.shape[1] + 1, use_cache=False).logits[
            :, : labels.shape[1]
        ]
    batched = answer_logprob(logits, labels)
    alone = torch.tensor([_alone(backbone, item, text) for item in items for text in item.options.values()])
    torch.testing.assert_close(batched, alone, atol=2e-4, rtol=1e-4)
    best = [list(item.options)[int(alone[4 * i : 4 * i + 4].argmax())] for i, item in enumerate(items)]
    assert choose(backbone, items, batch_size=2, answer="text") == best


def test_the_text_prompt_asks_for_the_option_text(items):
    prompt = items[0].prompt("text")
    assert prompt.endswith(TEXT_ANSWER_INSTRUCTION) and "\nA. " in prompt
    with pytest.raises(ValueError, match="answer must be one of letter, text"):
        items[0].prompt("words")


def test_the_answer_style_travels_in_the_checkpoint_config(tmp_path, items):
    model = load_backbone("tiny")
    assert answer_style(model.model) == "letter"
    model.model.config.mcq_answer = "text"
    save_backbone(model, tmp_path)
    loaded = load_backbone(str(tmp_path))
    assert answer_style(loaded.model) == "text"
    assert choose(loaded, items) == choose(loaded, items, answer="text")


def test_the_profiler_scores_options_like_choose(tmp_path, items):
    backbone = load_backbone("tiny")
    backbone.model.config.mcq_answer = "text"
    profiler = Profiler(backbone, repeats=1, warmup=0)
    assert profiler.score == "options"
    workload = dataclasses.replace(resolve_workload("demo-vqa"), dataset="demo:val", samples=5, batch_size=2)
    measurement = profiler.reference(workload)
    expected = choose(backbone, items, answer="text")
    assert measurement.accuracy == sum(c == item.answer for c, item in zip(expected, items)) / len(items)
    assert measurement.accuracy_score == "options"
    with pytest.raises(ValueError, match="score must be one of logits, generate, options"):
        Profiler(backbone, score="letters")
