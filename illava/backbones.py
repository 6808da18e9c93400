"""Offline backbones: seeded built-ins of every supported family, and a loader for local checkpoints.

No model hub is reachable where this project is developed and tested, yet the engine must run on the
real architectures. So the built-ins are real transformers models built from a config with seeded
random weights, a deterministic byte-level BPE tokenizer (2670 tokens) trained in-process on a corpus
in this module, and the family's PIL (torchvision-free) image processor. Each family's adapter
(`illava.adapters`) declares its built-ins and builds their configs; this module trains the
tokenizer, seeds the weights and loads checkpoints.

- ``tiny`` (Qwen2.5-VL): for unit tests. 1,995,456 parameters (vision 424,000, LLM 1,571,456); a
  prefill forward on one 112x112 image takes ~7 ms on the development CPU.
- ``small`` (Qwen2.5-VL): for CPU benchmarks. 129,057,728 parameters (vision 8,522,944, LLM
  120,534,784), shaped like the 7B model where it matters for speed: the LLM costs far more per token
  than the encoder per patch (14x more parameters per position; the 7B has ~11x), so on one 448x448
  image (1024 patches, 256 image tokens, 275 tokens in all) the vision encoder takes 28-29% of the
  prefill forward (0.13 s of 0.46 s; three runs gave 0.283, 0.288, 0.286), and 33% on one 672x672
  image. Measured on the development machine (2-core Intel Xeon, torch 2.13 CPU, fp32, sdpa, default
  thread count, median of 7 runs after 2 warm-up runs, encoder and prefill timed alternately) with::

      python -m illava.backbones small --image-size 448 --runs 7

- ``tiny-qwen2-vl``, ``tiny-qwen3-vl``, ``tiny-llava-onevision``: the other families at unit-test size.
- ``demo`` (Qwen2.5-VL): trained on the demo VQA benchmark by ``illava-tune train-demo``; loaded from
  the checkpoint committed in ``illava/checkpoints/demo`` through ``from_pretrained``.

Any other name is a local checkpoint directory (e.g. a downloaded Qwen2.5-VL-7B-Instruct): its
``config.json``'s ``model_type`` picks the adapter, which loads it through transformers' Auto classes
with ``local_files_only=True``: nothing is ever downloaded.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from .adapters import BackboneAdapter, adapter_for_config, adapters
from .adapters.base import Backbone
from .errors import UnsupportedModelError
from .inputs import Sample, build_inputs, synthetic_image

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
#: The built-in tokenizer's special tokens (every family's placeholders are among them).
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
#: Extra special tokens for families whose placeholders are not Qwen's (LLaVA-OneVision's ``<image>``).
#: They extend a separate tokenizer, so the Qwen built-ins (and their weights) never change.
TOKENIZER_VOCAB_SIZE = 3072

DEMO_CHECKPOINT = Path(__file__).parent / "checkpoints" / "demo"
#: Built-ins loaded from a committed checkpoint rather than built with seeded weights.
TRAINED_BACKBONES = {"demo": DEMO_CHECKPOINT}


# ---------------------------------------------------------------------------------------------
# Built-ins
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Builtin:
    """A built-in backbone: its name, its family's adapter and that adapter's size spec."""

    name: str
    adapter: BackboneAdapter
    spec: Any

    @property
    def description(self) -> str:
        return f"{self.adapter.family}: {self.spec.description}"


def builtins() -> dict[str, Builtin]:
    """Every built-in the registered adapters declare, by name (seeded and trained alike)."""
    found = {}
    for adapter in adapters():
        for name, spec in adapter.builtins().items():
            found[name] = Builtin(name, adapter, spec)
    return found


def builtin_names() -> tuple[str, ...]:
    """Names `load_backbone` knows without a path: the trained ones first, then the seeded ones."""
    names = list(builtins())
    return (*(n for n in TRAINED_BACKBONES if n in names), *(n for n in names if n not in TRAINED_BACKBONES))


def seeded_names() -> tuple[str, ...]:
    return tuple(name for name in builtins() if name not in TRAINED_BACKBONES)


def _builtin(name: str) -> Builtin:
    found = builtins()
    if name not in found:
        raise ValueError(f"unknown built-in backbone {name!r}; built-ins are {sorted(found)}")
    return found[name]


def __getattr__(name: str) -> Any:
    # Read at use, so a family registered later is included.
    if name == "NAMED_BACKBONES":
        return builtin_names()
    if name == "BUILTIN_BACKBONES":
        return {n: b.spec for n, b in builtins().items() if n not in TRAINED_BACKBONES}
    if name == "DEMO_SPEC":
        return _builtin("demo").spec
    raise AttributeError(name)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# Written for this module. Prompts in tests and benchmarks are plain English about pictures and
# videos, so the corpus talks about those; the word lists give the BPE enough distinct words to
# reach the target vocabulary.
_CORPUS = """
Describe the image in detail. What is shown in this picture? How many objects can you see?
What color is the large square on the left? Is there a circle near the top of the image?
Answer the question using a single word or phrase. Look at the video and tell me what happens.
Which shape moves from the left side to the right side? What is the person holding in the hand?
The image shows a red square, a blue circle and a green triangle on a light gray background.
In the first frame the yellow ball is near the bottom; in the last frame it has rolled to the corner.
A small brown dog sits on a wooden floor next to a white door. The sky is clear and bright blue.
There are three cars parked along the street, and a tall building stands behind them.
A woman is reading a book under a tree while two children play with a kite in the park.
The chart has four bars; the second bar is the highest and the last bar is the lowest.
The table lists the name, the price and the weight of each item in the store.
On the desk there is a laptop, a cup of coffee, a pair of glasses and a stack of papers.
The train leaves the station at seven in the morning and arrives in the city before noon.
A cat is sleeping on the sofa, and a lamp casts a warm light across the quiet room.
The mountains are covered with snow, and a narrow river flows through the green valley below.
Please count the number of people in the photo and say what each of them is doing.
The text on the sign reads open every day from nine to five, except on public holidays.
Vision language models encode an image into patches, merge neighbouring patches into tokens,
and feed those tokens to a language model together with the words of the question.
Many visual tokens are redundant: large flat regions of the same colour carry little information.
Merging similar tokens inside the encoder and inside the language model reduces the cost of
attention and of the feed forward layers, so the answer comes faster with almost the same quality.
The tuning service measures latency, memory and accuracy for each schedule and keeps the best ones.
A schedule says in which layers tokens are merged and how many tokens are kept at each step.
The model answered the question correctly, but it took too long on the small graphics card.
Yesterday it rained all afternoon, so we stayed inside, cooked soup and watched an old film.
The market was busy: people bought fresh bread, apples, oranges, cheese, fish and flowers.
He opened the window, listened to the birds, and wrote a short letter to his grandmother.
The bridge crosses the wide river at its narrowest point, just south of the old harbour.
Her garden has roses, tulips and sunflowers, and a small pond with orange fish.
The score was two to one, and the crowd cheered loudly when the final whistle blew.
Each student must submit the report by Friday; late work will not be accepted.
Turn left at the second corner, walk past the bakery, and the museum is on your right.
The robot picked up the blue block, placed it on the red block, and then stopped moving.
The picture was taken at sunset, when the light is soft and the shadows are long.
A group of friends is sitting around a fire on the beach, singing and laughing.
The kitchen is clean and modern, with white cabinets, a steel sink and a large window.
An airplane flies above the clouds while the sun rises slowly over the horizon.
The boy in the striped shirt is holding a red balloon and smiling at the camera.
The video shows a ball bouncing three times before it comes to rest against the wall.
Numbers: zero one two three four five six seven eight nine ten eleven twelve twenty thirty
forty fifty sixty seventy eighty ninety hundred thousand million first second third fourth fifth
0 1 2 3 4 5 6 7 8 9 10 12 16 20 24 32 48 64 100 112 128 224 256 336 448 512 672 1024 2024 2025
Colours: red orange yellow green blue purple violet pink brown black white gray grey silver gold
Shapes: square circle triangle rectangle ellipse line dot star cross arrow ring stripe grid
Positions: left right top bottom middle center centre corner edge above below behind front inside
outside between near far next beside across along around over under through toward away
Yes. No. Maybe. True. False. A. B. C. D. (A) (B) (C) (D) Option A, option B, option C, option D.
"""

_WORDS = """
about above accept across act action activity actually add address adult affect after again
against age agency agent ago agree agreement ahead air all allow almost alone along already also
although always among amount analysis and animal another answer any anyone anything appear apply
approach area argue arm around arrive art article artist as ask assume at attack attention
audience author authority available avoid away baby back bad bag ball bank bar base be beat
beautiful because become bed before begin behavior believe benefit best better between beyond big
bill billion bit black blood board body book born both box boy break bring brother budget build
building business but buy by call camera campaign can cancer candidate capital car card care
career carry case catch cause cell central century certain certainly chair challenge chance change
character charge check child choice choose church citizen city civil claim class clear clearly
close coach cold collection college color come commercial common community company compare
computer concern condition conference consider consumer contain continue control cost could
country couple course court cover create crime cultural culture current customer cut dark data
daughter day dead deal death debate decade decide decision deep defense degree democratic describe
design despite detail determine develop development difference different difficult dinner
direction director discover discuss discussion disease do doctor dog door down draw dream drive
drop drug during each early east easy eat economic economy edge education effect effort eight
either election else employee end energy enjoy enough enter entire environment environmental
especially establish even evening event ever every everybody everyone everything evidence exactly
example executive exist expect experience expert explain eye face fact factor fail fall family far
fast father fear federal feel feeling few field fight figure fill film final finally financial
find fine finger finish fire firm first fish five floor fly focus follow food foot for force
foreign forget form former forward four free friend from front full fund future game garden gas
general generation get girl give glass go goal good government great ground group grow growth
guess gun guy hair half hand hang happen happy hard have head health hear heart heat heavy help
her here herself high him himself his history hit hold home hope hospital hot hotel hour house how
however huge human hundred husband idea identify if image imagine impact important improve include
including increase indeed indicate individual industry information inside instead institution
interest interesting international interview into investment involve issue item its itself job
join just keep key kid kill kind kitchen know knowledge land language large last late later laugh
law lawyer lay lead leader learn least leave left leg legal less let letter level lie life light
like likely line list listen little live local long look lose loss lot love low machine magazine
main maintain major majority make man manage management manager many market marriage material
matter may maybe me mean measure media medical meet meeting member memory mention message method
middle might military million mind minute miss mission model modern moment money month more
morning most mother mouth move movement movie much music must myself name nation national natural
nature near nearly necessary need network never new news newspaper next nice night none nor north
not note nothing notice now number occur of off offer office officer official often oil ok old on
once one only onto open operation opportunity option or order organization other others our out
outside over own owner page pain painting paper parent part participant particular particularly
partner party pass past patient pattern pay peace people per perform performance perhaps period
person personal phone physical pick picture piece place plan plant play player point police policy
political politics poor popular population position positive possible power practice prepare
present president pressure pretty prevent price private probably problem process produce product
production professional professor program project property protect prove provide public pull
purpose push put quality question quickly quite race radio raise range rate rather reach read
ready real reality realize really reason receive recent recently recognize record reduce reflect
region relate relationship religious remain remember remove report represent require research
resource respond response responsibility rest result return reveal rich right rise risk road rock
role room rule run safe same save say scene school science scientist score sea season seat second
section security see seek seem sell send senior sense series serious serve service set seven
several shake share she shoot short shot should shoulder show side sign significant similar simple
simply since sing single sister sit site situation six size skill skin small smile so social
society soldier some somebody someone something sometimes son song soon sort sound source south
southern space speak special specific speech spend sport spring staff stage stand standard star
start state statement station stay step still stock stop store story strategy street strong
structure student study stuff style subject success successful such suddenly suffer suggest
summer support sure surface system table take talk task tax teach teacher team technology
television tell ten tend term test than thank that the their them themselves then theory there
these they thing think third this those though thought thousand threat three through throughout
throw thus time to today together tonight too top total tough toward town trade traditional
training travel treat treatment tree trial trip trouble true truth try turn type under understand
unit until up upon us use usually value various very victim view violence visit voice vote wait
walk wall want war watch water way we weapon wear week weight well west western what whatever when
where whether which while white who whole whom whose why wide wife will win wind window wish with
within without woman wonder word work worker world worry would write writer wrong yard yeah year
yes yet you young your yourself
attention encoder decoder token tokens patch patches merge merging merged window windows layer
layers latency throughput memory accuracy schedule schedules budget pixel pixels frame frames video
videos resolution batch prefill decode cache kernel tensor vector matrix softmax cluster clusters
recycle importance score scores reduction ratio encoder vision visual textual multimodal benchmark
"""


@functools.lru_cache(maxsize=4)
def _tokenizer_json(extra_special: tuple[str, ...] = ()) -> str:
    """Train the byte-level BPE once per process; the trainer breaks ties by pair order, so it is deterministic."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=[*SPECIAL_TOKENS, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = [line for line in (_CORPUS + _WORDS).splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer.to_str()


def tokenizer_fingerprint(extra_special: tuple[str, ...] = ()) -> str:
    """sha256 of the built-in tokenizer; the built-in models are identical wherever this is identical."""
    return hashlib.sha256(_tokenizer_json(tuple(extra_special)).encode()).hexdigest()


def build_tokenizer(extra_special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A fresh fast tokenizer with the Qwen special tokens (and `extra_special`), left padding
    (batched generation needs it)."""
    extra_special = tuple(extra_special)
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(extra_special)),
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[*SPECIAL_TOKENS[1:], *extra_special],
        padding_side="left",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def special_ids(tokenizer: PreTrainedTokenizerFast, tokens: tuple[str, ...] = ()) -> dict[str, int]:
    """Ids of the special tokens (and the roles "pad", "eos"); each must be one token or the model's
    placeholders break."""
    wanted = (*SPECIAL_TOKENS, *tokens)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in wanted}
    missing = [token for token, idx in ids.items() if idx is None or idx == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}")
    return {**ids, "pad": ids[PAD_TOKEN], "eos": ids[IM_END]}


# ---------------------------------------------------------------------------------------------
# Configs, processors and generation settings of the built-ins
# ---------------------------------------------------------------------------------------------


def build_tokenizer_for(name: str) -> PreTrainedTokenizerFast:
    return build_tokenizer(_builtin(name).adapter.extra_special_tokens)


def build_config(name: str):
    """Config of a built-in backbone (or of `demo`'s untrained architecture); token ids and vocabulary
    come from its tokenizer."""
    builtin = _builtin(name)
    tokenizer = build_tokenizer_for(name)
    ids = special_ids(tokenizer, builtin.adapter.extra_special_tokens)
    return builtin.adapter.build_config(builtin.spec, ids, len(tokenizer))


def build_image_processor(name: str = "tiny"):
    """The PIL image processor of a built-in (no torchvision)."""
    builtin = _builtin(name)
    return builtin.adapter.builtin_image_processor(builtin.spec)


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy by default, stopping at <|im_end|> or <|endoftext|> like the Instruct checkpoints."""
    ids = special_ids(tokenizer)
    return GenerationConfig(
        bos_token_id=ids[PAD_TOKEN],
        eos_token_id=[ids[IM_END], ids[PAD_TOKEN]],
        pad_token_id=ids[PAD_TOKEN],
        do_sample=False,
    )


# ---------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------


def load_backbone(
    name_or_path: str | Path,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Backbone:
    """A seeded built-in with weights seeded by `seed`, a trained built-in shipped in the package
    (`demo`), or a local checkpoint directory of any supported family.

    `attn_implementation` is handed to transformers: "sdpa", "eager", or "flash_attention_2" on CUDA
    with flash-attn installed. Built-ins are initialised in fp32 and then cast, so a bf16 built-in is
    the rounded fp32 one.
    """
    name = str(name_or_path)
    if name in TRAINED_BACKBONES:
        checkpoint = TRAINED_BACKBONES[name]
        if not (checkpoint / "config.json").is_file():
            raise ValueError(f"the {name} checkpoint is missing from {checkpoint}; `illava-tune train-demo` makes it")
        backbone = load_checkpoint(checkpoint, attn_implementation=attn_implementation, dtype=dtype)
        backbone.name = name
        return backbone
    if name in builtins():
        return _build_builtin(name, attn_implementation=attn_implementation, dtype=dtype, seed=seed)
    return load_checkpoint(Path(name), attn_implementation=attn_implementation, dtype=dtype)


def build_untrained(name: str, *, seed: int = 0, attn_implementation: str = "sdpa") -> Backbone:
    """A built-in architecture (including `demo`'s) with seeded fp32 weights: where training starts."""
    return _build_builtin(name, attn_implementation=attn_implementation, dtype=torch.float32, seed=seed)


def _build_builtin(name: str, *, attn_implementation: str, dtype: torch.dtype, seed: int) -> Backbone:
    """Initialise in fp32 under a forked RNG, so weights depend on the seed only (not on dtype or caller state)."""
    builtin = _builtin(name)
    tokenizer = build_tokenizer_for(name)
    config = build_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builtin.adapter.classes()[0]._from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    model.generation_config = _generation_config(tokenizer)
    model = model.to(dtype).eval()
    return Backbone(model, tokenizer, build_image_processor(name), name, builtin.adapter)


def load_checkpoint(path: Path, *, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> Backbone:
    """A local checkpoint directory of any supported family; never touches the hub."""
    if not (path / "config.json").is_file():
        raise ValueError(
            f"backbone {str(path)!r} is neither a built-in ({', '.join(builtin_names())}) nor a local "
            "checkpoint directory with a config.json; other names must be local checkpoint directories "
            "(nothing is downloaded from a model hub)"
        )
    try:
        adapter = adapter_for_config(path)
    except UnsupportedModelError as error:
        raise ValueError(f"backbone {str(path)!r}: {error}") from None
    return adapter.load(path, attn_implementation=attn_implementation, dtype=dtype)


def backbone_config(name_or_path: str | Path):
    """The config of a built-in or a local checkpoint, without loading weights; a checkpoint of a
    family no adapter supports is an error naming its ``model_type`` and the supported ones."""
    from transformers import AutoConfig

    name = str(name_or_path)
    if name in builtins() and name not in TRAINED_BACKBONES:
        return build_config(name)
    path = TRAINED_BACKBONES.get(name, Path(name))
    if not (path / "config.json").is_file():
        raise ValueError(
            f"unknown backbone {name!r}: built-ins are {list(builtin_names())}; "
            "any other name must be a local checkpoint directory with a config.json"
        )
    try:
        adapter_for_config(path)
    except UnsupportedModelError as error:
        raise ValueError(f"backbone {name!r}: {error}") from None
    return AutoConfig.from_pretrained(path, local_files_only=True)


def save_backbone(backbone: Backbone, path: str | Path) -> Path:
    """Write model, tokenizer and image processor so that `load_backbone(path)` restores the same logits."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backbone.model.save_pretrained(path)
    backbone.tokenizer.save_pretrained(path)
    backbone.image_processor.save_pretrained(path)
    return path


def count_parameters(name: str) -> dict[str, int]:
    """Parameter counts of a built-in by part, from a model on the meta device (no memory, no init)."""
    builtin = _builtin(name)
    with torch.device("meta"):
        model = builtin.adapter.classes()[0]._from_config(build_config(name))
    inner = builtin.adapter.inner_model(model)
    vision = sum(p.numel() for p in builtin.adapter.vision_tower(inner).parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"vision": vision, "llm": total - vision, "total": total}


# ---------------------------------------------------------------------------------------------
# Encoder share measurement (the figure in the module docstring)
# ---------------------------------------------------------------------------------------------


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def measure_encoder_share(name: str, *, image_size: int = 448, runs: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median time of the vision encoder and of the whole prefill forward on one image and a short prompt.

    The two are timed alternately in each run, so that drift in machine load hits both alike.
    """
    backbone = load_backbone(name)
    sample = Sample(text="<image>Describe the image in detail.", images=[synthetic_image(image_size, seed=0)])
    inputs = build_inputs(backbone, [sample])
    model = backbone.model
    inner = backbone.adapter.inner_model(model)

    def vision() -> None:
        backbone.adapter.encode_images(inner, inputs)

    def prefill() -> None:
        model(**inputs, use_cache=True, logits_to_keep=1)

    times = [(_seconds(vision), _seconds(prefill)) for _ in range(warmup + runs)][warmup:]
    vision_s = statistics.median(t for t, _ in times)
    prefill_s = statistics.median(t for _, t in times)
    return {
        "vision_s": vision_s,
        "prefill_s": prefill_s,
        "encoder_share": vision_s / prefill_s,
        "seq_len": float(inputs["input_ids"].shape[1]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Parameter counts and encoder share of a built-in backbone.")
    parser.add_argument("name", choices=sorted(seeded_names()))
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"threads={torch.get_num_threads()} params={count_parameters(args.name)}")
    result = measure_encoder_share(args.name, image_size=args.image_size, runs=args.runs, warmup=args.warmup)
    print(" ".join(f"{key}={value:.4f}" for key, value in result.items()))


if __name__ == "__main__":
    main()
