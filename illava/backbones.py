"""Offline Qwen2.5-VL backbones: two built-in seeded models and a loader for local checkpoints.

No model hub is reachable where this project is developed and tested, yet the merging code must run
on the real architecture (windowed vision attention, 2x2 patch merger, GQA, 3-D mRoPE). So the
built-ins are real `Qwen2_5_VLForConditionalGeneration` models built from a config with seeded random
weights, a deterministic byte-level BPE tokenizer (2670 tokens) trained in-process on a corpus in this
module, and transformers' PIL (torchvision-free) Qwen2-VL image processor.

- ``tiny``: for unit tests. 1,995,456 parameters (vision 424,000, LLM 1,571,456); a prefill forward
  on one 112x112 image takes ~7 ms on the development CPU.
- ``small``: for CPU benchmarks. 129,057,728 parameters (vision 8,522,944, LLM 120,534,784), shaped
  like the 7B model where it matters for speed: the LLM costs far more per token than the encoder per
  patch (14x more parameters per position; the 7B has ~11x), so on one 448x448 image (1024 patches, 256
  image tokens, 275 tokens in all) the vision encoder takes 28-29% of the prefill forward (0.13 s of
  0.46 s; three runs gave 0.283, 0.288, 0.286), and 33% on one 672x672 image. Measured on the
  development machine (2-core Intel Xeon, torch 2.13 CPU, fp32, sdpa, default thread count, median of
  7 runs after 2 warm-up runs, encoder and prefill timed alternately) with::

      python -m illava.backbones small --image-size 448 --runs 7

Any other name is a local checkpoint directory (e.g. a downloaded Qwen2.5-VL-7B-Instruct), loaded
with ``from_pretrained`` and ``local_files_only=True``: nothing is ever downloaded.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .inputs import Sample, build_inputs, synthetic_image

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

TOKENIZER_VOCAB_SIZE = 3072
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# 56*56 .. 28*28*1280 pixels: the Qwen2-VL defaults. 448x448 and 672x672 are multiples of 28 inside
# the range, so the processor keeps them as they are (32x32 and 48x48 patches).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280


@dataclass(frozen=True)
class BackboneSpec:
    """The size knobs of a built-in backbone; everything else follows the real Qwen2.5-VL."""

    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    fullatt_block_indexes: tuple[int, ...]
    text_layers: int
    text_hidden: int
    text_intermediate: int
    text_heads: int
    text_kv_heads: int
    description: str


BUILTIN_BACKBONES: dict[str, BackboneSpec] = {
    "tiny": BackboneSpec(
        vision_depth=6,
        vision_hidden=64,
        vision_intermediate=128,
        vision_heads=4,
        fullatt_block_indexes=(2, 5),
        text_layers=6,
        text_hidden=128,
        text_intermediate=256,
        text_heads=4,
        text_kv_heads=2,
        description="unit-test size, a few M parameters",
    ),
    "small": BackboneSpec(
        vision_depth=16,
        vision_hidden=192,
        vision_intermediate=512,
        vision_heads=4,
        fullatt_block_indexes=(3, 7, 11, 15),
        text_layers=16,
        text_hidden=768,
        text_intermediate=2560,
        text_heads=12,
        text_kv_heads=2,
        description="CPU benchmark size, ~129M parameters, 7B-like encoder/LLM cost split",
    ),
}

# The trained `demo` backbone's architecture. It is not built with seeded weights like the two above:
# `illava-tune train-demo` trains it from this spec and `load_backbone("demo")` loads the committed
# checkpoint in DEMO_CHECKPOINT through `from_pretrained`, the path a downloaded checkpoint takes.
DEMO_SPEC = BackboneSpec(
    vision_depth=8,
    vision_hidden=96,
    vision_intermediate=192,
    vision_heads=4,
    fullatt_block_indexes=(3, 7),
    text_layers=6,
    text_hidden=192,
    text_intermediate=512,
    text_heads=4,
    text_kv_heads=2,
    description="trained on the demo VQA benchmark; ~4.6M parameters, committed checkpoint",
)
DEMO_CHECKPOINT = Path(__file__).parent / "checkpoints" / "demo"
#: Every name `load_backbone` knows without a path.
NAMED_BACKBONES: tuple[str, ...] = ("demo", *BUILTIN_BACKBONES)


@dataclass
class Backbone:
    """A model with the tokenizer and image processor that belong to it."""

    model: Qwen2_5_VLForConditionalGeneration
    tokenizer: PreTrainedTokenizerFast
    image_processor: Qwen2VLImageProcessorPil
    name: str


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


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; the trainer breaks ties by pair order, so it is deterministic."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = [line for line in (_CORPUS + _WORDS).splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer.to_str()


def tokenizer_fingerprint() -> str:
    """sha256 of the built-in tokenizer; the built-in models are identical wherever this is identical."""
    return hashlib.sha256(_tokenizer_json().encode()).hexdigest()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh fast tokenizer with the Qwen special tokens, left padding (batched generation needs it)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        padding_side="left",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Ids of the special tokens; each must be one token or the model's placeholders break."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    missing = [token for token, idx in ids.items() if idx is None or idx == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}")
    return ids


# ---------------------------------------------------------------------------------------------
# Image processor and config
# ---------------------------------------------------------------------------------------------


def build_image_processor() -> Qwen2VLImageProcessorPil:
    """The PIL Qwen2-VL processor (no torchvision); 448x448 and 672x672 images keep their size."""
    return Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (t, h, w) as the real model does (16, 24, 24 of 64)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _spec(name: str) -> BackboneSpec:
    if name == "demo":
        return DEMO_SPEC
    try:
        return BUILTIN_BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown built-in backbone {name!r}; built-ins are {sorted(BUILTIN_BACKBONES)}") from None


def build_config(name: str) -> Qwen2_5_VLConfig:
    """Config of a built-in backbone (or of `demo`'s untrained architecture); token ids and vocabulary
    come from `build_tokenizer`."""
    spec = _spec(name)
    tokenizer = build_tokenizer()
    ids = _special_ids(tokenizer)
    text_head_dim = spec.text_hidden // spec.text_heads
    vision = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_heads=spec.vision_heads,
        hidden_act="silu",
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        window_size=112,
        fullatt_block_indexes=list(spec.fullatt_block_indexes),
        out_hidden_size=spec.text_hidden,
        tokens_per_second=2,
    )
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(text_head_dim)},
        bos_token_id=ids[PAD_TOKEN],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD_TOKEN],
    )
    return Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy by default, stopping at <|im_end|> or <|endoftext|> like the Instruct checkpoints."""
    ids = _special_ids(tokenizer)
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
    """A built-in (`tiny`, `small`) with weights seeded by `seed`, the trained `demo` checkpoint shipped
    in the package, or a local checkpoint directory.

    `attn_implementation` is handed to transformers: "sdpa", "eager", or "flash_attention_2" on CUDA
    with flash-attn installed. Built-ins are initialised in fp32 and then cast, so a bf16 built-in is
    the rounded fp32 one.
    """
    name = str(name_or_path)
    if name in BUILTIN_BACKBONES:
        return _build_builtin(name, attn_implementation=attn_implementation, dtype=dtype, seed=seed)
    if name == "demo":
        if not (DEMO_CHECKPOINT / "config.json").is_file():
            raise ValueError(
                f"the demo checkpoint is missing from {DEMO_CHECKPOINT}; `illava-tune train-demo` makes it"
            )
        backbone = _load_checkpoint(DEMO_CHECKPOINT, attn_implementation=attn_implementation, dtype=dtype)
        backbone.name = "demo"
        return backbone
    return _load_checkpoint(Path(name), attn_implementation=attn_implementation, dtype=dtype)


def build_untrained(name: str, *, seed: int = 0, attn_implementation: str = "sdpa") -> Backbone:
    """A built-in architecture (including `demo`'s) with seeded fp32 weights: where training starts."""
    return _build_builtin(name, attn_implementation=attn_implementation, dtype=torch.float32, seed=seed)


def _build_builtin(name: str, *, attn_implementation: str, dtype: torch.dtype, seed: int) -> Backbone:
    """Initialise in fp32 under a forked RNG, so weights depend on the seed only (not on dtype or caller state)."""
    tokenizer = build_tokenizer()
    config = build_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    model.generation_config = _generation_config(tokenizer)
    model = model.to(dtype).eval()
    return Backbone(model=model, tokenizer=tokenizer, image_processor=build_image_processor(), name=name)


def _load_checkpoint(path: Path, *, attn_implementation: str, dtype: torch.dtype) -> Backbone:
    """Real checkpoint from a local directory; never touches the hub."""
    if not (path / "config.json").is_file():
        raise ValueError(
            f"backbone {str(path)!r} is neither a built-in ({', '.join(NAMED_BACKBONES)}) nor a local "
            "checkpoint directory with a config.json; other names must be local checkpoint directories "
            "(nothing is downloaded from a model hub)"
        )
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    return Backbone(model=model, tokenizer=tokenizer, image_processor=image_processor, name=str(path))


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
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(build_config(name))
    vision = sum(p.numel() for p in model.model.visual.parameters())
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
    inputs = build_inputs(backbone.tokenizer, backbone.image_processor, [sample])
    model = backbone.model

    def vision() -> None:
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])

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
    parser.add_argument("name", choices=sorted(BUILTIN_BACKBONES))
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"threads={torch.get_num_threads()} params={count_parameters(args.name)}")
    result = measure_encoder_share(args.name, image_size=args.image_size, runs=args.runs, warmup=args.warmup)
    print(" ".join(f"{key}={value:.4f}" for key, value in result.items()))


if __name__ == "__main__":
    main()
