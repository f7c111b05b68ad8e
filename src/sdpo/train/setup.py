"""Setting a run up: the accelerator, the output folder (claim, overwrite, resume point with the config
check), the cache, the policy and its reference, the optimizer and schedule, and the ``TrainingRun`` the
phases share (``sdpo.train.run``). Everything that needs no model is checked before the model is loaded.

``prepare_run`` is the whole set-up after the folder is claimed: a benchmark or another trainer gets a
run ready to step from it (``make_accelerator`` then ``prepare_run(..., ResumePoint())``)."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn

from sdpo.errors import InputError, MissingFileError, MissingPackageError, UnwritableError
from sdpo.folders import check_kind
from sdpo.models.base import ModelSpec
from sdpo.train.augment import samples_latents
from sdpo.train.checkpoint import (
    CONFIG_NAME,
    STATE_NAME,
    checkpoint_step,
    complete_checkpoints,
    latest_checkpoint,
    read_state,
    register_trainable_hooks,
    remove_checkpoint,
)
from sdpo.train.checkpointing_choice import checkpoint_before_prepare, settle_checkpointing
from sdpo.train.config import TrainConfig
from sdpo.train.ema import EMA_FOLDER, build_ema, check_ema_supported, load_ema
from sdpo.train.log import note, warn
from sdpo.train.lora_targets import resolve_lora_targets
from sdpo.train.metrics import BAD_STEPS_NAME
from sdpo.train.order import batch_order
from sdpo.train.pair_weights import PairWeights
from sdpo.train.resume_policy import check_resume
from sdpo.train.run import PairDataset, ResumePoint, TrainingData, TrainingRun
from sdpo.train.sharding import (
    enable_gradient_checkpointing,
    parameters_are_sharded,
    set_deepspeed_batch_size,
    shard_like_policy,
    start_cpu_process_group,
    uses_fsdp,
)
from sdpo.train.step import adapters_disabled

if TYPE_CHECKING:
    from accelerate import Accelerator

EXPORT_TMP_NAME = ".export-tmp"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"

RUN_FILES = frozenset({"metrics.jsonl", BAD_STEPS_NAME, "run_info.json", "train_config.json", "logs", "validation",
                       LORA_WEIGHTS_NAME, "unet", "transformer", EMA_FOLDER, EXPORT_TMP_NAME})
"""What a run writes into its folder (besides checkpoint-N): a folder holding any of them holds a run."""



def check_writable(output_dir: Path) -> None:
    """Create the output folder and prove this process can write into it (one-line error if not)."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # A probe of its own per process: with one shared name, one process could delete the file
        # another had just written, and that process's unlink then failed as "not writable".
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        raise UnwritableError(f"output folder is not writable: {output_dir} ({error.strerror})") from error


def make_accelerator(config: TrainConfig, output_dir: Path) -> Accelerator:
    """The run's accelerator (precision, accumulation, trackers, logging folder), the seed set."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    trackers = {"none": None, "all": "all"}.get(config.report_to, config.report_to)
    _forget_other_precision(config.mixed_precision)
    start_cpu_process_group()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(config.seed)
    return accelerator


def _forget_other_precision(mixed_precision: str) -> None:
    """Let a second ``train`` in one process (a notebook, a sweep) use another mixed precision.

    accelerate keeps one process-wide state and refuses a new precision; the process group
    (PartialState) is kept, only the precision-bearing part is cleared.
    """
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def resume_point(output_dir: Path, resume: str | None, config: TrainConfig, overwrite: bool,
                 main: bool) -> ResumePoint:
    """The checkpoint to start from, its config checked against ``config`` (unsafe changes refused)."""
    check_kind(output_dir, "run")  # never train into (or --overwrite) a generate folder, a cache, ...
    if not resume:
        _claim_fresh_folder(output_dir, overwrite, main)
        return ResumePoint()
    checkpoint = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
    if checkpoint is None:
        note(f"--resume latest: no checkpoint in {output_dir} yet, starting from step 0", main)
        return ResumePoint()
    state = read_state(checkpoint) if checkpoint.is_dir() else None
    if state is None:
        raise MissingFileError(f"not a complete checkpoint (no readable {STATE_NAME}): {checkpoint}")
    changes = _checked_changes(checkpoint, config)
    if changes:
        note(f"resuming from {checkpoint.name} with changed settings: {'; '.join(map(str, changes))}", main)
    return ResumePoint(checkpoint=checkpoint, step=int(state["step"]), state=state, changes=changes)


def _checked_changes(checkpoint: Path, config: TrainConfig) -> list[Any]:
    path = checkpoint / CONFIG_NAME
    if not path.is_file():
        warn(f"{checkpoint} holds no {CONFIG_NAME} (an older checkpoint): the config is not checked", stacklevel=3)
        return []
    try:
        saved = TrainConfig.from_dict(json.loads(path.read_text()))
    except ValueError as error:
        raise InputError(f"cannot read the config saved in {path}: {error}") from None
    return check_resume(saved, config)


def _claim_fresh_folder(output_dir: Path, overwrite: bool, main: bool) -> None:
    """Refuse a folder that holds a run (unless ``overwrite``); a fresh run starts with no old files."""
    found = sorted(p.name for p in output_dir.iterdir() if p.name in RUN_FILES or checkpoint_step(p) is not None)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise InputError(f"output folder {output_dir} already holds a run ({shown}): pass --resume latest to "
                         f"continue it, --overwrite to replace it, or choose another output_dir")
    if main:
        note(f"--overwrite: deleting the run in {output_dir}")
        for folder in complete_checkpoints(output_dir):
            remove_checkpoint(folder)
        for name in found:
            path = output_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def already_finished(output_dir: Path, config: TrainConfig, resume: str | None) -> int | None:
    """``--resume latest`` on a run whose export has landed and that kept no checkpoint: its final step
    (nothing to do), else None."""
    if resume != "latest" or complete_checkpoints(output_dir) or not (output_dir / "run_info.json").is_file():
        return None
    try:
        final_step = json.loads((output_dir / "run_info.json").read_text()).get("final_step")
    except ValueError:
        return None
    if not isinstance(final_step, int):
        return None
    if final_step < config.max_steps:
        raise MissingFileError(f"{output_dir} finished at step {final_step} and kept no checkpoint to continue "
                                f"from to max_steps={config.max_steps} (set checkpoint_every to keep one)")
    note(f"{output_dir} already finished (step {final_step}): nothing to do")
    return final_step


def open_cache(config: TrainConfig) -> PairDataset:
    """The run's precompute cache, checked to match the configured model."""
    from sdpo.data import (  # late: media readers
        CachedPairs,
        CachedSamples,
        check_cache_matches,
        load_manifest,
    )

    reader = CachedSamples if load_manifest(config.cache_dir).kind == "samples" else CachedPairs
    dataset = reader(config.cache_dir)
    check_cache_matches(dataset.manifest, config.family, config.pretrained or None)
    return dataset


def holds_samples(dataset: Any) -> bool:
    """Whether ``dataset`` holds labelled samples (a CachedSamples, or a sequence of ``Sample``), not pairs."""
    from sdpo.data.batch import Sample

    kind = getattr(dataset, "kind", None)
    return kind == "samples" if kind is not None else len(dataset) > 0 and isinstance(dataset[0], Sample)


def check_method_fits_data(config: TrainConfig, dataset: Any) -> None:
    """Diffusion-KTO trains on labelled samples and every other method on pairs: one line when they differ."""
    samples = holds_samples(dataset)
    if config.method.unpaired and not samples:
        raise InputError(f"method kto trains on labelled samples, and {config.cache_dir or 'the dataset'} holds "
                         "pairs: make samples (`sdpo pairs --strategy threshold|quantile`) and precompute them")
    if samples and not config.method.unpaired:
        raise InputError(f"{config.cache_dir} holds labelled samples, which only method kto trains on "
                         f"(this run: {config.method.name})")
    if samples and config.pair_weighting != "none":
        raise InputError("pair_weighting weighs pairs by their score gap; a samples cache has no pairs: set it to none")


def prepare_run(config: TrainConfig, spec: ModelSpec | None, dataset: TrainingData | None, accelerator: Accelerator,
                output_dir: Path, start: ResumePoint) -> TrainingRun:
    """A run ready to step: the data checks that need no model, then ``build_run``, then the batch order."""
    if dataset is not None and not hasattr(dataset, "micro_step"):  # one bringing its own objective (GRPO) fits
        check_method_fits_data(config, dataset)
    # Before the model loads: a cache without the gaps pair_weighting needs is a one-line error.
    pair_weights = None if dataset is None else PairWeights.from_dataset(
        config.pair_weighting, dataset, str(getattr(dataset, "cache_dir", None) or config.cache_dir or "the dataset"))
    # Likewise latent_sampling=sample on a cache without stds.
    sample_latents = dataset is not None and samples_latents(config.latent_sampling, dataset)
    run = build_run(config, spec, dataset, accelerator, output_dir, start)
    run.pair_weights, run.sample_latents = pair_weights, sample_latents
    if dataset is not None:
        run.order = batch_order(dataset, config, accelerator)
    settle_checkpointing(run)
    return run


def build_run(config: TrainConfig, spec: ModelSpec | None, dataset: TrainingData | None, accelerator: Accelerator,
              output_dir: Path, start: ResumePoint) -> TrainingRun:
    """Load the model (if not given), add the adapters, prepare optimizer and schedule, load the checkpoint."""
    from diffusers.optimization import get_scheduler

    check_ema_supported(config, parameters_are_sharded(accelerator))  # before a model loads
    if spec is None:
        from sdpo.models.registry import load_spec

        media_format = getattr(dataset, "media_format", None)  # a CachedPairs knows it; a plain sequence does not
        spec = load_spec(config.family, config.pretrained, load_vae=False, load_text_encoder=False,
                         media_format=media_format)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    model, reference_copy = _policy_and_reference(spec, config, accelerator, weight_dtype)
    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad], config)
    lr_scheduler = get_scheduler(
        config.lr_schedule,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )
    set_deepspeed_batch_size(accelerator, config.train_batch_size)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    register_trainable_hooks(accelerator, model)

    def reference() -> Any:
        if reference_copy is None:
            return adapters_disabled(model)
        return _offloaded(reference_copy, accelerator.device, config.offload_reference and not uses_fsdp(accelerator))

    run = TrainingRun(config=config, accelerator=accelerator, spec=spec, dataset=dataset, model=model, optimizer=optimizer,
               lr_scheduler=lr_scheduler, params=[p for p in model.parameters() if p.requires_grad],
               reference=reference, weight_dtype=weight_dtype, output_dir=output_dir, resume=start)
    run.ema = build_ema(config, run.params)  # a copy of the initial weights; a resume overwrites it
    if start.checkpoint is not None:
        accelerator.load_state(str(start.checkpoint))
        if run.ema is not None:
            load_ema(run.ema, model, start.checkpoint, start.state.get("ema_updates"))
        run.bad_steps = int(start.state.get("bad_steps", 0))
        run.config_changes = list(start.state.get("config_changes", []))
    if start.changes:
        run.config_changes.append({"step": start.step, "changes": [
            {"field": c.field, "old": c.old, "new": c.new} for c in start.changes]})
    return run


def _policy_and_reference(
    spec: ModelSpec, config: TrainConfig, accelerator: Accelerator, weight_dtype: torch.dtype
) -> tuple[nn.Module, nn.Module | None]:
    """The trainable denoiser and, for full fine-tuning, its frozen reference copy (None with LoRA:
    the reference is the same network with its adapters disabled)."""
    model = spec.denoiser
    model.requires_grad_(False)
    reference_copy: nn.Module | None = None
    if config.lora_rank > 0:
        cast_frozen(model, accelerator.device, weight_dtype)
        add_lora(model, config, spec)
        for param in model.parameters():  # adapters train in float32 whatever the base dtype
            if param.requires_grad:
                param.data = param.data.float()
    elif config.method.needs_reference:
        # The reference keeps the trained weights' dtype: a bf16 copy computes differently from the
        # float32 policy and, times beta, biases the loss away from ln 2 before any update.
        reference_copy = copy.deepcopy(model).requires_grad_(False).eval()
        if uses_fsdp(accelerator):
            reference_copy = shard_like_policy(accelerator, reference_copy)
        else:
            reference_copy.to("cpu" if config.offload_reference else accelerator.device)
    if config.lora_rank <= 0:  # a reference-free method (MaPO) keeps no frozen copy
        model.requires_grad_(True)
        model.to(accelerator.device)
    if checkpoint_before_prepare(config, accelerator):  # "auto" may be settled after prepare, by a probe
        enable_gradient_checkpointing(accelerator, model)
    model.train()
    return model, reference_copy


class _offloaded:
    """Context manager that brings a CPU-parked reference to the device only while it is used."""

    def __init__(self, module: nn.Module, device: torch.device, offload: bool) -> None:
        self.module, self.device, self.offload = module, device, offload

    def __enter__(self) -> nn.Module:
        if self.offload:
            self.module.to(self.device)
        return self.module

    def __exit__(self, *exc: object) -> None:
        if self.offload:
            self.module.to("cpu")


def cast_frozen(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Move a frozen base network to ``device`` and ``dtype``, keeping the modules the model marks as
    float32-only (``_keep_in_fp32_modules``, e.g. Wan's time embedder and norms) in float32, as
    ``from_pretrained`` does. diffusers' warning about casting with ``to()`` is muted: this is the fix."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        model.to(device, dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    if dtype != torch.float32 and keep:
        for name, module in model.named_modules():
            if any(part in name for part in keep):
                module.to(torch.float32)


def add_lora(model: nn.Module, config: TrainConfig, spec: ModelSpec) -> None:
    """Add the configured LoRA adapter to ``model`` (and start it from ``init_lora`` when set)."""
    from peft import LoraConfig

    targets = resolve_lora_targets(config.lora_target_modules, spec.lora_target_modules(), model)
    lora = LoraConfig(
        r=config.lora_rank,
        # peft annotates an int; it only divides by the rank, so a float alpha is as good
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,  # type: ignore[arg-type]
        lora_dropout=config.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    cast(_PeftModel, model).add_adapter(lora)
    if config.init_lora is not None:
        _start_from_lora(model, Path(config.init_lora), spec.denoiser_subfolder)


class _PeftModel(Protocol):
    """A denoiser as LoRA sees it: every family's is a diffusers model, with peft's ``add_adapter``
    (ModelSpec types it as a plain torch module)."""

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None: ...


def _start_from_lora(model: nn.Module, folder: Path, prefix: str) -> None:
    """Copy a saved LoRA's A/B weights into the freshly added adapter ("default"), refusing any
    mismatch of targets or rank in one line: a partial load would train a silently different model."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file

    path = folder / LORA_WEIGHTS_NAME if folder.is_dir() else folder
    if not path.is_file():
        raise MissingFileError(f"init_lora: no {LORA_WEIGHTS_NAME} in {folder} (is it a finished LoRA run?)")
    saved = {key.removeprefix(f"{prefix}."): value for key, value in load_file(str(path)).items()}
    # The file holds diffusers' names (module.lora.down.weight), as save_lora wrote them through the
    # same conversion; the live adapter's are peft's (module.lora_A.default.weight).
    wanted = convert_state_dict_to_diffusers({
        key.replace(".default.", "."): key for key in model.state_dict()
        if ".lora_A.default." in key or ".lora_B.default." in key})
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing or extra:
        what = f"{len(missing)} adapted layer weight(s) missing, e.g. {missing[0]}" if missing else \
            f"{len(extra)} weight(s) for layers this run does not adapt, e.g. {extra[0]}"
        raise InputError(f"init_lora {folder}: other LoRA targets than this run's ({what})")
    current = model.state_dict()
    for name, key in wanted.items():
        if saved[name].shape != current[key].shape:
            raise InputError(f"init_lora {folder}: {name} has shape {tuple(saved[name].shape)}, this run's "
                             f"{tuple(current[key].shape)} (another lora_rank?)")
    model.load_state_dict({key: saved[name] for name, key in wanted.items()}, strict=False)


def _optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = dict(lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_epsilon,
                                  weight_decay=config.weight_decay)
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise MissingPackageError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)
