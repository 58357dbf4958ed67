"""Patient-level DP-SGD for one site's local training (client.py uses it with --dp_mechanism dpsgd).

Each step: draw a Poisson sample of the site's training cases (every case independently with probability 1/n, so a
step may hold 0, 1 or several cases), compute each case's gradient on its own, clip it to --dp_max_grad_norm, sum,
add Gaussian noise of sd noise_multiplier * max_grad_norm, divide by the expected batch size 1, and take the Adam
step. Clipping, noise and scaling are Opacus's ``DPOptimizer``; the sampler is Opacus's
``UniformWithReplacementSampler``; the noise multiplier comes from privacy.plan_dpsgd.

Per-case gradients are computed one case at a time (a forward and backward pass each) rather than with Opacus's
``GradSampleModule``: its backward hooks fail on MONAI's SegResNet, whose residual blocks add in place
(``x += identity``; measured with opacus 1.6.0 and monai 1.6.1, both in "hooks" and "functorch" modes). With an
expected batch of one case this costs what the non-private step costs. GroupNorm keeps cases independent, so the
per-case gradient is exact.

The sampler and the noise draw from generators seeded by the operating system, never by --seed: DP noise that can
be regenerated from a public seed protects nothing.
"""

from __future__ import annotations

import os

import torch
from monai.data import DataLoader, list_data_collate
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from privacy import DPSGDPlan


def secret_generator() -> torch.Generator:
    """A CPU generator seeded from the operating system's entropy pool."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def collate_or_none(batch: list):
    """MONAI's collate, or None for the empty batches Poisson sampling produces."""
    return list_data_collate(batch) if batch else None


def poisson_loader(dataset, plan: DPSGDPlan, generator: torch.Generator, num_workers: int = 0) -> DataLoader:
    """One epoch = plan.steps_per_epoch Poisson-sampled batches (the sampling the accountant assumes)."""
    if len(dataset) != plan.n_train:
        raise ValueError(f"the plan is for {plan.n_train} training cases but the dataset has {len(dataset)}")
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset), sample_rate=plan.sample_rate, generator=generator, steps=plan.steps_per_epoch
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_or_none, num_workers=num_workers)


def make_dp_optimizer(optimizer: torch.optim.Optimizer, plan: DPSGDPlan, generator: torch.Generator) -> DPOptimizer:
    """Wrap the site's optimizer: clip each case's gradient, add the calibrated noise, divide by 1 (the expected
    batch size: with Poisson sampling the actual size must not be used, it would leak how many cases were drawn)."""
    return DPOptimizer(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=1,
        loss_reduction="mean",
        generator=generator,
    )


def set_per_case_gradients(model, loss_fn, image: torch.Tensor | None, label: torch.Tensor | None,
                           extra_loss=None) -> list[float]:
    """Store each case's gradient in ``p.grad_sample`` (cases x parameter shape), as DPOptimizer expects.

    ``extra_loss(model)`` (e.g. FedProx's proximal term) is added to every case's loss; it does not depend on the
    data, and clipping bounds each case's whole contribution anyway. An empty batch gets 0-row gradients, so the
    step adds pure noise (the accountant counts it like any other step). Returns each case's loss.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n_cases = 0 if image is None else image.shape[0]
    per_param: list[list[torch.Tensor]] = [[] for _ in params]
    losses = []
    for i in range(n_cases):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(image[i : i + 1]), label[i : i + 1])
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        losses.append(float(loss.detach()))
        for slot, p in zip(per_param, params):
            slot.append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    for slot, p in zip(per_param, params):
        p.grad_sample = torch.stack(slot) if slot else torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    return losses


def train_one_round(model, global_model, loader, optimizer: DPOptimizer, loss_fn, fedprox, epochs: int,
                    device: torch.device) -> tuple[int, float]:
    """DP-SGD local training; returns (optimiser steps, mean loss over the cases drawn). No mixed precision."""
    model.train()
    extra = (lambda m: fedprox(m, global_model)) if fedprox is not None else None
    steps, losses = 0, []
    for _ in range(epochs):
        for batch in loader:
            image = label = None
            if batch is not None:
                image, label = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            losses += set_per_case_gradients(model, loss_fn, image, label, extra)
            optimizer.step()
            steps += 1
    optimizer.zero_grad(set_to_none=True)
    return steps, sum(losses) / max(len(losses), 1)
