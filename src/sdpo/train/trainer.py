"""The accelerate training loop: one process, DDP, DeepSpeed or FSDP, through the same code.

The loop knows the ModelSpec protocol and the precompute cache, never a model family.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sdpo.data.cache import collate_pairs
from sdpo.models.base import ModelSpec, cast_frozen, to_device_dtype, unwrap
from sdpo.train.config import TrainConfig
from sdpo.train.preemption import StopRequests
from sdpo.train.sharding import (
    enable_gradient_checkpointing,
    parameters_are_sharded,
    shard_like_policy,
    uses_fsdp,
)
from sdpo.train.step import adapters_disabled, draw_for_pairs, preference_step

TIMESTEP_BUCKETS = 10
MINIMUM_KEY = "weight_min"
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    """The run folder (LoRA or model, metrics.jsonl, logs/, checkpoints)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Logged metrics, one dict per logging step (what metrics.jsonl holds)."""
    model: nn.Module | None = None
    """The trained denoiser (unwrapped), still in memory for evaluation."""
    stopped_at: int | None = None
    """The step after which a stop signal ended the run early (its checkpoint is saved), or None."""
    stop_signal: str | None = None
    """The signal that stopped this process's run (None if another process received it)."""


class GlobalBatchOrder:
    """Which pairs each process sees: one seeded permutation per epoch, cut into global batches.

    Process r takes rows [r*B, (r+1)*B) of each global batch, so the union over processes is the
    batch a single process with B x world pairs would see.
    """

    def __init__(self, num_pairs: int, per_process: int, world: int, rank: int, seed: int) -> None:
        if num_pairs < per_process * world:
            raise ValueError(
                f"the cache holds {num_pairs} pairs, fewer than one global batch "
                f"({per_process} x {world} processes)"
            )
        self.num_pairs, self.per_process, self.world, self.rank, self.seed = num_pairs, per_process, world, rank, seed
        self.global_batch = per_process * world
        self.batches_per_epoch = num_pairs // self.global_batch  # the ragged tail is dropped
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, micro_step: int) -> tuple[Tensor, Tensor]:
        """(dataset indices of this process's pairs, their positions in the global batch)."""
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_pairs, generator=generator)
        start = position * self.global_batch + self.rank * self.per_process
        rows = torch.arange(start, start + self.per_process)
        return self._order[rows], rows - position * self.global_batch


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"output folder is not writable: {output_dir} ({error.strerror})") from error


def _add_lora(model: nn.Module, config: TrainConfig, spec: ModelSpec) -> None:
    from peft import LoraConfig

    from sdpo.train.config import resolve_lora_targets

    targets = resolve_lora_targets(config.lora_target_modules, spec.lora_target_modules(), model)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
        lora_dropout=config.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    model.add_adapter(lora)


def _optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_epsilon,
                  weight_decay=config.weight_decay)
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


class _IntervalMeter:
    """Sums metrics between logging steps, then reduces them over processes."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.minimum = math.inf
        self.count = 0
        self.bucket_sum = torch.zeros(TIMESTEP_BUCKETS, dtype=torch.float64)
        self.bucket_count = torch.zeros(TIMESTEP_BUCKETS, dtype=torch.float64)

    def add(self, metrics: dict[str, float], timesteps: Tensor, raw_weights: Tensor, num_timesteps: int) -> None:
        for key, value in metrics.items():
            if key == MINIMUM_KEY:  # a minimum, not a mean: reduced separately
                self.minimum = min(self.minimum, float(value))
                continue
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1
        buckets = (timesteps.cpu() * TIMESTEP_BUCKETS // num_timesteps).clamp_max(TIMESTEP_BUCKETS - 1)
        self.bucket_sum.index_add_(0, buckets, raw_weights.detach().cpu().double())
        self.bucket_count.index_add_(0, buckets, torch.ones_like(buckets, dtype=torch.float64))

    def flush(self, accelerator: Any, num_timesteps: int) -> dict[str, float]:
        keys = sorted(self.sums)
        local = torch.tensor([self.sums[k] for k in keys] + [float(self.count)], dtype=torch.float64)
        packed = torch.cat([local, self.bucket_sum, self.bucket_count]).to(accelerator.device)
        total = accelerator.reduce(packed, reduction="sum").cpu()
        count = total[len(keys)].item()
        result = {key: total[i].item() / max(count, 1.0) for i, key in enumerate(keys)}
        sums = total[len(keys) + 1 : len(keys) + 1 + TIMESTEP_BUCKETS]
        counts = total[len(keys) + 1 + TIMESTEP_BUCKETS :]
        width = num_timesteps // TIMESTEP_BUCKETS
        if math.isfinite(self.minimum) or accelerator.num_processes > 1:
            local_min = torch.tensor([self.minimum], dtype=torch.float64, device=accelerator.device)
            result[MINIMUM_KEY] = accelerator.gather(local_min).min().item()
        for b in range(TIMESTEP_BUCKETS):
            if counts[b] > 0:
                result[f"w_by_t/{b * width:04d}-{(b + 1) * width - 1:04d}"] = (sums[b] / counts[b]).item()
        self.__init__()
        return result


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    done = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def train(
    config: TrainConfig,
    spec: ModelSpec | None = None,
    dataset: Any = None,
    resume: str | None = None,
    progress: bool = True,
    on_log: Callable[[int, dict[str, float], nn.Module], None] | None = None,
) -> TrainResult:
    """Fine-tune ``spec.denoiser`` on the cached pairs with the configured preference objective.

    Args:
        config: the validated training configuration.
        spec: a loaded ModelSpec; None loads ``config.family`` from ``config.pretrained`` (denoiser
            and scheduler only: training reads latents and embeddings from the cache).
        dataset: pairs as dicts (see ``sdpo.data``); None opens ``config.cache_dir``.
        resume: "latest" or a checkpoint folder to continue from.
        progress: show a progress bar on the main process.
        on_log: called on the main process after each logging step with (step, metrics, model).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    output_dir = Path(config.output_dir)
    _check_writable(output_dir)
    trackers = {"none": None, "all": "all"}.get(config.report_to, config.report_to)
    _forget_other_precision(config.mixed_precision)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(config.seed)

    if spec is None:
        from sdpo.models.registry import load_spec

        spec = load_spec(config.family, config.pretrained, load_vae=False, load_text_encoder=False)
    if dataset is None:
        from sdpo.data import CachedPairs, check_cache_matches

        dataset = CachedPairs(config.cache_dir)
        check_cache_matches(dataset.manifest, spec.family, config.pretrained)
        spec.media_format = dataset.media_format  # the size the cache was encoded at (validation samples it)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    model, reference_copy = _policy_and_reference(spec, config, accelerator, weight_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, config)
    lr_scheduler = get_scheduler(
        config.lr_schedule,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP replaces them with sharded ones

    def reference():
        if reference_copy is None:
            return adapters_disabled(model)
        return _offloaded(reference_copy, accelerator.device, config.offload_reference and not uses_fsdp(accelerator))

    order = GlobalBatchOrder(len(dataset), config.train_batch_size, accelerator.num_processes,
                             accelerator.process_index, config.seed)
    first_step = 0
    if resume:
        checkpoint = latest_checkpoint(output_dir) if resume == "latest" else Path(resume)
        if checkpoint is None or not (checkpoint / "trainer_state.json").is_file():
            raise FileNotFoundError(f"no checkpoint to resume from in {output_dir if resume == 'latest' else resume}")
        accelerator.load_state(str(checkpoint))
        first_step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]

    if accelerator.is_main_process and trackers is not None:
        accelerator.init_trackers("sdpo", config=_flat_config(config))
    metrics_path = output_dir / "metrics.jsonl"
    history: list[dict[str, float]] = _read_history(metrics_path, first_step) if resume else []
    meter = _IntervalMeter()
    warned_all_masked = False
    num_timesteps = spec.schedule.num_timesteps
    sample_shape = tuple(dataset[0]["latents_chosen"].shape)
    if progress and accelerator.is_main_process:
        tqdm.write(_announcement(spec, config, accelerator, params, len(dataset)))
    bar = tqdm(range(first_step, config.max_steps), desc=f"train {config.method.name}", initial=first_step,
               total=config.max_steps, disable=not (progress and accelerator.is_main_process), unit="step")

    stopped_at: int | None = None
    with StopRequests() as stops:
        for step in bar:
            grad_norm = torch.tensor(0.0)
            for micro in range(config.gradient_accumulation_steps):
                micro_step = step * config.gradient_accumulation_steps + micro
                rows, positions = order.indices(micro_step)
                batch = _to_device(collate_pairs([dataset[int(i)] for i in rows]), accelerator.device, weight_dtype)
                draws = draw_for_pairs(positions, micro_step, config.seed, sample_shape, num_timesteps,
                                       config.t_min, config.t_max, config.method.estimator == "sampled")
                with accelerator.accumulate(model), accelerator.autocast():
                    result = preference_step(spec, model, batch, draws, config.method, reference)
                    if not torch.isfinite(result.output.loss):
                        raise FloatingPointError(
                            f"non-finite loss at step {step}: lower the learning rate or beta, or use bf16 not fp16"
                        )
                    accelerator.backward(result.output.loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm or math.inf)
                        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns the norm as a DTensor
                            grad_norm = grad_norm.full_tensor()
                        elif grad_norm is None:  # DeepSpeed clips inside its engine and may not report it
                            grad_norm = torch.tensor(math.nan)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                metrics = {k: v.item() for k, v in result.output.metrics.items()}
                meter.add(metrics, result.timesteps, result.raw_weights, num_timesteps)
            done = step + 1
            if done % config.log_every == 0 or done == config.max_steps:
                logged = meter.flush(accelerator, num_timesteps)
                logged.update(grad_norm=float(grad_norm), lr=lr_scheduler.get_last_lr()[0], step=done)
                if accelerator.is_main_process:
                    if logged.get("masked_fraction", 0.0) >= 1.0 and not warned_all_masked:
                        warned_all_masked = True
                        warnings.warn(
                            f"every pair member was masked up to step {done} (w below method.mask_threshold="
                            f"{config.method.mask_threshold}), so the loss has no gradient; lower the threshold "
                            "or start from a base model that fits the pairs better",
                            stacklevel=2,
                        )
                    history.append(logged)
                    with metrics_path.open("a") as handle:
                        handle.write(json.dumps(logged) + "\n")
                    accelerator.log({k: v for k, v in logged.items() if k != "step"}, step=done)
                    bar.set_postfix(loss=f"{logged['loss']:.4f}", acc=f"{logged['accuracy']:.2f}")
                    if on_log is not None:
                        on_log(done, logged, unwrap(model))
            validate_now = config.validation_every and done % config.validation_every == 0
            # A sharded model's forward is collective, so then every process samples and the main one writes.
            samples_here = accelerator.is_main_process or parameters_are_sharded(accelerator)
            if config.validation_prompts and samples_here and (validate_now or done == config.max_steps):
                from sdpo.train.validation import write_validation_samples

                write_validation_samples(spec, model, list(config.validation_prompts), output_dir / "validation" /
                                         f"step-{done:06d}", config.validation_inference_steps, config.seed,
                                         write=accelerator.is_main_process)
            saved = config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.max_steps
            if saved:
                _save_checkpoint(accelerator, output_dir, done, config.checkpoints_total_limit)
            if done < config.max_steps and stops.agreed(accelerator):
                if not saved:
                    _save_checkpoint(accelerator, output_dir, done, config.checkpoints_total_limit)
                stopped_at = done
                break

    if stopped_at is not None:
        bar.close()
        accelerator.end_training()
        return TrainResult(output_dir=output_dir, history=history, model=unwrap(accelerator.unwrap_model(model)),
                           stopped_at=stopped_at, stop_signal=stops.received)
    accelerator.wait_for_everyone()
    # Collective: under FSDP / ZeRO-3 each process holds a shard; this gathers the full state.
    state_dict = accelerator.get_state_dict(model)
    final = unwrap(accelerator.unwrap_model(model))
    if accelerator.is_main_process:
        if config.lora_rank > 0:
            spec.save_lora(output_dir, final, state_dict)
        else:
            spec.save_full(output_dir, final, state_dict)
        (output_dir / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (output_dir / "run_info.json").write_text(json.dumps(_run_info(accelerator), indent=2))
    accelerator.end_training()
    return TrainResult(output_dir=output_dir, history=history, model=final)


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


def _policy_and_reference(
    spec: ModelSpec, config: TrainConfig, accelerator: Any, weight_dtype: torch.dtype
) -> tuple[nn.Module, nn.Module | None]:
    """The trainable denoiser and, for full fine-tuning, its frozen reference copy (None with LoRA:
    the reference is the same network with its adapters disabled)."""
    model = spec.denoiser
    model.requires_grad_(False)
    reference_copy: nn.Module | None = None
    if config.lora_rank > 0:
        cast_frozen(model, accelerator.device, weight_dtype)
        _add_lora(model, config, spec)
        for param in model.parameters():  # adapters train in float32 whatever the base dtype
            if param.requires_grad:
                param.data = param.data.float()
    else:
        # The reference keeps the trained weights' dtype: a bf16 copy computes differently from the
        # float32 policy and, times beta, biases the loss away from ln 2 before any update.
        reference_copy = copy.deepcopy(model).requires_grad_(False).eval()
        if uses_fsdp(accelerator):
            reference_copy = shard_like_policy(accelerator, reference_copy)
        else:
            reference_copy.to("cpu" if config.offload_reference else accelerator.device)
        model.requires_grad_(True)
        model.to(accelerator.device)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(accelerator, model)
    model.train()
    return model, reference_copy


def _announcement(spec: ModelSpec, config: TrainConfig, accelerator: Any, params: list, num_pairs: int) -> str:
    """One line saying what the run is about to do."""
    trainable = sum(p.numel() for p in params)
    what = f"LoRA rank {config.lora_rank}" if config.lora_rank > 0 else "full fine-tuning"
    processes = accelerator.num_processes
    launch = "one process" if processes == 1 else f"{processes} processes ({accelerator.distributed_type.value})"
    pairs_per_step = config.train_batch_size * config.gradient_accumulation_steps * processes
    return (f"sdpo: {spec.family}, {config.method.name}, {what} ({trainable:,} trainable parameters), {launch}, "
            f"mixed precision {config.mixed_precision}; {config.max_steps} steps of {pairs_per_step} pairs from "
            f"{num_pairs} cached pairs")


def _run_info(accelerator: Any) -> dict[str, Any]:
    """How the run was launched, for the record: the config alone does not say it."""
    import accelerate
    import diffusers

    return {
        "distributed_type": str(accelerator.distributed_type.value),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "accelerate": accelerate.__version__},
    }


def _forget_other_precision(mixed_precision: str) -> None:
    """Let a second ``train`` in one process (a notebook, a sweep) use another mixed precision.

    accelerate keeps one process-wide state and refuses a new precision; the process group
    (PartialState) is kept, only the precision-bearing part is cleared.
    """
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _to_device(batch: dict, device: torch.device, weight_dtype: torch.dtype) -> dict:
    # Conditioning follows the frozen weights' dtype: a cache encoded in bf16 then trains in fp32 too.
    return {
        "latents_chosen": batch["latents_chosen"].to(device),
        "latents_rejected": batch["latents_rejected"].to(device),
        "cond": to_device_dtype(batch["cond"], device, weight_dtype),
    }


def _save_checkpoint(accelerator: Any, output_dir: Path, step: int, keep: int | None) -> None:
    folder = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        # The state file is written last: a folder without it is an interrupted save, never resumed from.
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
        if keep is not None:
            done = sorted(
                (p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").is_file()),
                key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]),
            )
            for old in done[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _read_history(path: Path, up_to_step: int) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [row for row in rows if row.get("step", 0) <= up_to_step]
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))
    return kept


def _flat_config(config: TrainConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}
