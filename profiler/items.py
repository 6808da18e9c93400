"""A multiple-choice question with its images: what datasets are read into and benchmarks generate.

Its own module so that the readers (`profiler.datasets`) and the generated benchmark
(`profiler.demo_vqa`) both build on it without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from PIL import Image

from illava.inputs import IMAGE_MARKER, VIDEO_MARKER, Sample

LETTERS = "ABCDEFGH"
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
TEXT_ANSWER_INSTRUCTION = "Answer with the option's text."
ANSWER_STYLES = ("letter", "text")


@dataclass(frozen=True)
class MCQItem:
    """One multiple-choice question with its decoded RGB images."""

    index: str
    question: str
    options: dict[str, str]
    answer: str
    images: tuple[Image.Image, ...]
    category: str | None = None
    hint: str | None = None

    def __post_init__(self) -> None:
        reason = options_problem(self.options, self.answer)
        if reason:
            raise ValueError(f"item {self.index!r}: {reason}")

    def prompt(self, answer: str = "letter") -> str:
        """The lmms-eval / VLMEvalKit prompt: images first, then hint, question, lettered options, instruction.

        `answer` picks the instruction: ``letter`` (answer with the option's letter, the default) or
        ``text`` (answer with the option's text, for models scored by option likelihood).

        Literal ``<image>``/``<video>`` in the dataset's text would be taken for input markers, so they
        are written as ``[image]``/``[video]``.
        """
        lines = [escape(self.hint)] if self.hint else []
        lines.append(escape(self.question))
        lines += [f"{letter}. {escape(text)}" for letter, text in self.options.items()]
        if answer not in ANSWER_STYLES:
            raise ValueError(f"answer must be one of {', '.join(ANSWER_STYLES)}, got {answer!r}")
        lines.append(ANSWER_INSTRUCTION if answer == "letter" else TEXT_ANSWER_INSTRUCTION)
        return f"{IMAGE_MARKER}\n" * len(self.images) + "\n".join(lines)

    def to_sample(self, answer: str = "letter") -> Sample:
        """What `illava.inputs.build_inputs` takes (`answer` as in `prompt`)."""
        return Sample(text=self.prompt(answer), images=list(self.images))


def escape(text: str) -> str:
    return text.replace(IMAGE_MARKER, "[image]").replace(VIDEO_MARKER, "[video]")


def option_letters(options: Mapping[str, str]) -> list[str]:
    """The option letters present, in letter order."""
    return [letter for letter in LETTERS if letter in options]


def options_problem(options: Mapping[str, str], answer: str) -> str | None:
    """Why options/answer are unusable, or None; shared by the dataset readers and MCQItem."""
    letters = list(options)
    if any(letter not in LETTERS for letter in letters):
        return f"option keys must be letters {LETTERS[0]}-{LETTERS[-1]}, got {letters}"
    if len(letters) < 2:
        return f"needs at least 2 options, found {len(letters)} ({', '.join(letters) or 'none'})"
    if letters != list(LETTERS[: len(letters)]):
        return f"options must be consecutive from A in letter order, got {', '.join(letters)}"
    if answer not in options:
        return f"answer {answer!r} is not one of the row's options {', '.join(letters)}"
    return None
