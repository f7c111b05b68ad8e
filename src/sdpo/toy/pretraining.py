"""What both worlds' base models share: settings, tokenizer, text encoder, pretraining loop, cache folders.

Each world's config extends ``PretrainSettings`` with its denoiser's fields and supplies a builder
of fresh models and the loss of one batch; ``pretrain`` runs the shuffled-epoch AdamW loop with
warm-up, cosine decay and an exponential moving average of the weights around it, and
``pretrain_base_model`` caches the result as a diffusers-style folder (``unet/`` or ``transformer/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, and the marker ``sdpo_toy.json`` written last),
keyed by a hash of the config, so an interrupted run never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sdpo.errors import InputError

MARKER_FILE = "sdpo_toy.json"
"""Written last into a base-model folder: its presence marks the folder complete."""
PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class ToyCacheError(InputError):
    """A cached toy base-model folder is damaged or was made for another config."""


def corrupt_folder_error(folder: Path, why: str) -> ToyCacheError:
    """The error for a damaged cached base model, saying how to recover."""
    return ToyCacheError(f"toy base model folder {folder} is corrupt: {why}; delete it and run again to retrain it")


@dataclass(frozen=True)
class PretrainSettings:
    """Text-encoder and optimisation fields of a toy base-model config (a world's config extends it)."""

    text_hidden_size: int = 32
    """Width of the CLIP text encoder, and so of the denoiser's text conditioning."""
    text_layers: int = 1
    """Transformer layers of the text encoder."""
    text_heads: int = 2
    """Attention heads of the text encoder; must divide ``text_hidden_size``."""
    max_prompt_tokens: int = 8
    """Fixed padded prompt length in tokens, including the begin and end tokens."""
    num_train_timesteps: int = 1000
    """Length T of the training timestep grid."""
    train_steps: int = 1000
    """Optimiser steps of pretraining."""
    batch_size: int = 64
    """Samples per pretraining step."""
    learning_rate: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to a tenth of it)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warm-up."""
    ema_decay: float = 0.995
    """Decay of the exponential moving average of the weights that is saved (diffusers' ``EMAModel``, its
    default warm-up ``min(decay, n / (9 + n))``; 0 saves the raw weights)."""
    prompt_dropout: float = 0.1
    """Share of training prompts replaced by the empty prompt, so classifier-free guidance works."""
    seed: int = 0
    """Seed of initialisation, batches, noise and timesteps."""

    min_prompt_tokens: ClassVar[int] = 6
    """The shortest ``max_prompt_tokens`` that holds the world's prompts with begin and end tokens."""
    world: ClassVar[str | None] = None
    """The ``world`` entry of the folder's marker (None: the digits world, whose markers predate it)."""
    denoiser_subfolder: ClassVar[str] = "unet"
    """Folder of the denoiser in the saved model: "unet" or "transformer"."""

    def check_pretrain_settings(self) -> None:
        """Raise ValueError naming the first shared field that is out of range."""
        for name in ("text_hidden_size", "text_layers", "text_heads", "train_steps", "batch_size"):
            if int(getattr(self, name)) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        if self.text_hidden_size % self.text_heads:
            raise InputError(f"text_heads={self.text_heads} must divide text_hidden_size={self.text_hidden_size}")
        if self.max_prompt_tokens < self.min_prompt_tokens:
            raise InputError(
                f"max_prompt_tokens must be at least {self.min_prompt_tokens} to hold a prompt, "
                f"got {self.max_prompt_tokens}"
            )
        if self.num_train_timesteps < 2:
            raise InputError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if not self.learning_rate > 0:
            raise InputError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise InputError("weight_decay and warmup_steps must not be negative")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise InputError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        """The config from ``to_dict`` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**values)

    def hash_header(self) -> dict[str, Any]:
        """Entries hashed with the fields: the folder format (and world) the cache key stands for."""
        raise NotImplementedError

    def folder_name(self) -> str:
        """The cached folder's name: ``toy-base-<short_hash>`` (a world may name its folders otherwise)."""
        return f"toy-base-{self.short_hash()}"

    def pretrained_models(self, progress: bool) -> BaseModels:
        """Freshly initialised models (seeded), pretrained on the world's training data."""
        raise NotImplementedError

    def short_hash(self) -> str:
        """Ten hex digits identifying the config and the folder format (the cache key)."""
        text = json.dumps({**self.hash_header(), **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def build_text_encoder(settings: PretrainSettings, tokenizer: Any) -> nn.Module:
    """A fresh CLIP text encoder sized by ``settings`` for ``tokenizer`` (seed the RNG before calling)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.text_hidden_size,
        intermediate_size=4 * settings.text_hidden_size,
        num_hidden_layers=settings.text_layers,
        num_attention_heads=settings.text_heads,
        max_position_embeddings=settings.max_prompt_tokens,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ))


def learning_rate_at(settings: PretrainSettings, step: int) -> float:
    """Linear warm-up to ``learning_rate``, then cosine decay to a tenth of it at the last step."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.train_steps - settings.warmup_steps)
    return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


BatchLoss = Callable[[Tensor, torch.Generator], Tensor]
"""Loss of one batch: (indices into the training set, the run's generator) -> scalar loss."""


def pretrain(
    settings: PretrainSettings,
    modules: list[nn.Module],
    num_examples: int,
    batch_loss: BatchLoss,
    history: list[float],
    description: str,
    progress: bool = True,
) -> None:
    """Train ``modules`` jointly on ``batch_loss``; their weights end as the moving average.

    Batches are shuffled epochs over ``num_examples`` indices, so each example is seen equally
    often even with few steps; the generator that shuffles is the one ``batch_loss`` draws from.
    Appends each step's loss to ``history``.
    """
    from tqdm.auto import tqdm

    for module in modules:
        module.train()
    params = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    average = _moving_average(params, settings.ema_decay)

    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(num_examples, generator=generator)
    cursor = 0
    bar = tqdm(range(settings.train_steps), desc=description, disable=not progress, leave=False)
    for step in bar:
        if cursor + settings.batch_size > len(order):
            order = torch.randperm(num_examples, generator=generator)
            cursor = 0
        batch = order[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(settings, step)
        loss = batch_loss(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

        if average is not None:
            average.step(params)
        history.append(loss.item())
        if step % 25 == 0 or step == settings.train_steps - 1:
            recent = history[-50:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    bar.close()

    if average is not None:
        average.copy_to(params)
    for module in modules:
        module.eval()


def _moving_average(params: list[nn.Parameter], decay: float) -> Any:
    """diffusers' EMAModel of ``params`` (None when ``decay`` is 0).

    Without ``use_ema_warmup`` its decay at update n is ``min(decay, n / (9 + n))`` from the second
    update on (the usual warm-up: early weights are poor, so the average forgets them fast); the first
    update copies the weights.
    """
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay, use_ema_warmup=False, foreach=True)


def pretrain_into_cache(
    final: Path,
    settings: PretrainSettings,
    train_and_save: Callable[[Path], list[float]],
    check: Callable[[Path], Any],
) -> Path:
    """``final``, trained on first use and reused afterwards (``check`` validates it either way).

    ``train_and_save(folder)`` trains the model, writes it to ``folder`` and returns its loss
    history. It writes into a temporary sibling; the marker goes in last and the folder is renamed
    into place, so an interrupted run leaves nothing that could be mistaken for a finished model.
    """
    if final.exists():
        check(final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        history = train_and_save(temporary)
        tail = history[-100:]
        size = max(1, math.ceil(len(history) / 10))
        marker = {
            **settings.hash_header(),
            "complete": True,
            "config": settings.to_dict(),
            "config_hash": settings.short_hash(),
            "train_seconds": round(time.perf_counter() - start, 2),
            "train_cpu_seconds": round(time.process_time() - cpu_start, 2),
            "final_loss": sum(tail) / len(tail),
            # Mean loss over each tenth of training, to judge whether more steps would still help.
            "loss_by_tenth": [round(sum(history[i : i + size]) / len(history[i : i + size]), 4)
                              for i in range(0, len(history), size)],
            "torch_threads": torch.get_num_threads(),
        }
        (temporary / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.replace(temporary, final)
        except OSError:
            # Another process finished the same config first (the target is a non-empty folder):
            # its copy is as good as ours.
            if not final.exists():
                raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(temporary)
    check(final)
    return final


# ------------------------------------------------------------------------------------------ tokenizer
def vocabulary() -> list[str]:
    """The tokenizer's words: special tokens, the words of the digit prompt template and the ten numerals."""
    from sdpo.toy.digits.data import NUM_CLASSES, PROMPT_TEMPLATE

    template_words = PROMPT_TEMPLATE.replace("{digit}", "").split()
    words = [*SPECIAL_TOKENS, *template_words, *(str(d) for d in range(NUM_CLASSES))]
    return list(dict.fromkeys(words))


def build_tokenizer(max_length: int, extra_words: tuple[str, ...] = ()) -> Any:
    """A word-level fast tokenizer: lower-cased, whitespace split, [BOS] ... [EOS], padded with [PAD].

    Digit words are rewritten to numerals before the split ("seven" -> "7"), so the model, trained
    on numerals only, understands every prompt ``parse_digit`` accepts. ``extra_words`` (a world's
    own words, e.g. the motion directions) are added as whole-word tokens after the base vocabulary.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from sdpo.toy.digits.data import DIGIT_WORDS

    vocab = {word: index for index, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.normalizer = normalizers.Sequence(
        [
            normalizers.Lowercase(),
            *(normalizers.Replace(Regex(rf"\b{word}\b"), str(d)) for d, word in enumerate(DIGIT_WORDS)),
        ]
    )
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=max_length,
    )
    if extra_words:
        tokenizer.add_tokens([AddedToken(word, single_word=True) for word in extra_words])
    return tokenizer


def tokenize(tokenizer: Any, prompts: list[str], max_length: int) -> Tensor:
    """Token ids (B, max_length), padded to the fixed length as the denoiser was trained with."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids


# ------------------------------------------------------------------------------------------ cache folders
def default_cache_root() -> Path:
    """``$SDPO_CACHE`` if set, else ``~/.cache/sdpo``."""
    env = os.environ.get("SDPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sdpo"


def base_folder(config: PretrainSettings, cache_root: str | os.PathLike[str] | None = None) -> Path:
    """Where the base model of ``config`` is (or will be) cached, under ``cache_root`` (default:
    ``default_cache_root()``)."""
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    return root / config.folder_name()


def required_files(denoiser_subfolder: str) -> tuple[str, ...]:
    """Files that must exist in a complete folder; weights are checked further when read."""
    return (
        MARKER_FILE,
        f"{denoiser_subfolder}/config.json",
        f"{denoiser_subfolder}/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
    )


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``sdpo_toy.json`` of a toy folder; ToyCacheError if missing, unreadable or incomplete."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError) as error:
        raise corrupt_folder_error(folder, f"{MARKER_FILE} is missing or not valid JSON ({type(error).__name__})") from error
    if not isinstance(marker, dict) or marker.get("complete") is not True or "config" not in marker:
        raise corrupt_folder_error(folder, f"{MARKER_FILE} does not mark a completed pretraining")
    return marker


def check_folder(
    folder: str | os.PathLike[str], config_class: type[PretrainSettings], config: PretrainSettings | None = None
) -> dict[str, Any]:
    """Validate a base-model folder of ``config_class``'s world without loading the models; returns its marker.

    Checks the marker (complete, of this world), that every required file exists and parses
    (safetensors headers, JSON; a truncated copy fails), that it holds a valid config and, given
    ``config``, that the folder was trained with it. Raises ToyCacheError otherwise.
    """
    from safetensors import safe_open

    folder = Path(folder)
    marker = read_marker(folder)
    world = config_class.world
    if marker.get("world") != world:
        raise corrupt_folder_error(folder, f"{MARKER_FILE} is not a marker of world {world!r} "
                                           f"(world {marker.get('world')!r})")
    names = required_files(config_class.denoiser_subfolder)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise corrupt_folder_error(folder, f"missing {', '.join(missing)}")
    for name in names:
        try:
            if name.endswith(".safetensors"):
                with safe_open(str(folder / name), framework="pt") as handle:
                    if not list(handle.keys()):
                        raise InputError("no tensors")
            elif name.endswith(".json"):
                json.loads((folder / name).read_text())
        except Exception as error:  # noqa: BLE001 - any read failure means the file is damaged
            raise corrupt_folder_error(folder, f"{name} is unreadable ({type(error).__name__})") from error
    try:
        stored = config_class.from_dict(marker["config"])
    except (TypeError, ValueError) as error:
        raise corrupt_folder_error(folder, f"{MARKER_FILE} holds an invalid config ({error})") from error
    if config is not None and stored != config:
        raise corrupt_folder_error(folder, f"{MARKER_FILE} holds a different config than its name's hash")
    return marker


@dataclass
class BaseModels:
    """A world's freshly built (or trained) networks, and what ``save`` writes."""

    denoiser: nn.Module
    denoiser_subfolder: str
    """"unet" or "transformer": the denoiser's folder (and diffusers pipeline argument)."""
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any
    history: list[float] = field(default_factory=list)
    """Pretraining loss per step."""

    def save(self, folder: Path) -> None:
        """Write the four diffusers subfolders."""
        self.denoiser.save_pretrained(folder / self.denoiser_subfolder)
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.scheduler.save_pretrained(folder / "scheduler")


def pretrain_base(
    config: PretrainSettings | None = None,
    cache_root: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """The folder of the pretrained base model of ``config`` (default: the digits world's), trained on first use.

    A complete cached folder is reused as it is (after ``check_folder``); otherwise the model is
    built and trained by the config's world and written through ``pretrain_into_cache``. Raises
    ToyCacheError when the folder exists but is damaged.
    """
    if config is None:
        from sdpo.toy.digits.model import ToyModelConfig

        config = ToyModelConfig()

    def train_and_save(target: Path) -> list[float]:
        models = config.pretrained_models(progress)
        models.save(target)
        return models.history

    return pretrain_into_cache(base_folder(config, cache_root), config, train_and_save,
                               lambda found: check_folder(found, type(config), config))
