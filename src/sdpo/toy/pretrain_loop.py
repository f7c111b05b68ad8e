"""The pretraining loop of both worlds' base models: shuffled epochs, AdamW with warm-up and cosine decay,
and an exponential moving average of the weights that the models end with."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sdpo.toy.pretrain_settings import PretrainSettings


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
    average = moving_average(params, settings.ema_decay)

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


def moving_average(params: list[nn.Parameter], decay: float) -> Any:
    """diffusers' EMAModel of ``params`` (None when ``decay`` is 0).

    Without ``use_ema_warmup`` its decay at update n is ``min(decay, n / (9 + n))`` from the second
    update on (the usual warm-up: early weights are poor, so the average forgets them fast); the first
    update copies the weights.
    """
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay, use_ema_warmup=False, foreach=True)
