"""What follows each optimizer step of a run: validation samples, the periodic checkpoint, and the stop
signals (a stop saves a checkpoint to resume from)."""

from __future__ import annotations

from sdpo.train.checkpoint import save_run
from sdpo.train.preemption import StopRequests
from sdpo.train.run import TrainingRun
from sdpo.train.sharding import parameters_are_sharded
from sdpo.train.validation import write_validation_samples

__all__ = ["after_step"]


def after_step(run: TrainingRun, done: int, stops: StopRequests) -> bool:
    """Validation samples, a periodic checkpoint, and the stop signals; True when the run must stop now."""
    config, accelerator = run.config, run.accelerator
    validate_now = config.validation_every and done % config.validation_every == 0
    # A sharded model's forward is collective, so then every process samples and the main one writes.
    samples_here = run.main or parameters_are_sharded(accelerator)
    if config.validation_prompts and samples_here and (validate_now or done == config.max_steps):
        write_validation_samples(run.spec, run.model, list(config.validation_prompts),
                                 run.output_dir / "validation" / f"step-{done:06d}",
                                 config.validation_inference_steps, config.seed, write=run.main,
                                 guidance_scale=config.validation_guidance_scale)
    saved = bool(config.checkpoint_every) and done % config.checkpoint_every == 0 and done < config.max_steps
    if saved:
        save_run(run, done)
    if done < config.max_steps and stops.agreed(accelerator):
        if not saved:
            save_run(run, done)
        return True
    return False
