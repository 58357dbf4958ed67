"""Patient-level DP-SGD: calibration before training, the epsilon spent after each round, and the private step.

Each local step draws a Poisson sample of the site's training cases (every case independently with probability 1/n,
so a step may hold 0, 1 or several cases), computes each case's gradient on its own, clips it to
``dp_max_grad_norm``, sums, adds Gaussian noise of sd ``noise_multiplier * max_grad_norm``, divides by the expected
batch size 1, and takes the Adam step. Clipping, noise and scaling are Opacus's ``DPOptimizer``; the sampler is
Opacus's ``UniformWithReplacementSampler``; the noise multiplier is calibrated here with Opacus's RDP accountant
(never a hand-written one).

Per-case gradients are computed one case at a time (a forward and backward pass each) rather than with Opacus's
``GradSampleModule``: its backward hooks fail on MONAI's SegResNet, whose residual blocks add in place
(``x += identity``; measured with opacus 1.6.0 and monai 1.6.1, both in "hooks" and "functorch" modes). With an
expected batch of one case this costs what the non-private step costs. GroupNorm keeps cases independent, so the
per-case gradient is exact.

The sampler and the noise draw from generators seeded by the operating system, never by ``--seed``: DP noise that
can be regenerated from a public seed protects nothing.

torch, MONAI and Opacus are imported inside the functions that need them, so that job.py can calibrate (and refuse
an unreachable target) without loading them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from brats_fl.privacy import PrivacyConfigError

if TYPE_CHECKING:
    import torch
    from monai.data import DataLoader
    from opacus.optimizers import DPOptimizer

DPSGD_ACCOUNTANT = "rdp"  # Opacus's Renyi-DP accountant for the sampled Gaussian mechanism
DEFAULT_DELTA_FACTOR = 0.1  # default delta = 0.1 / (training cases at the site): well below 1/n


@dataclass(frozen=True)
class DPSGDPlan:
    """Everything that fixes a site's DP-SGD guarantee. Each local step samples every training case independently
    with probability 1/n_train (Poisson sampling, expected batch size 1, as the paper's batch of 1), and an epoch is
    n_train such steps, so the number of steps per round is fixed in advance."""

    n_train: int
    num_rounds: int
    epochs_per_round: int
    target_epsilon: float
    delta: float
    max_grad_norm: float
    noise_multiplier: float
    accountant: str = DPSGD_ACCOUNTANT

    @property
    def sample_rate(self) -> float:
        return 1.0 / self.n_train

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train

    @property
    def steps_per_round(self) -> int:
        return self.epochs_per_round * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.num_rounds * self.steps_per_round


def default_delta(n_train: int) -> float:
    """0.1 / n: a delta of 1/n or more would allow a mechanism that publishes one patient's record outright."""
    return DEFAULT_DELTA_FACTOR / n_train


def check_dpsgd_values(target_epsilon: float, delta: float | None, max_grad_norm: float) -> None:
    """The values no plan can use, whatever the data."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyConfigError(f"--dp_target_epsilon {target_epsilon}: need a finite value > 0")
    if delta is not None and not 0.0 < delta < 1.0:
        raise PrivacyConfigError(f"--dp_delta {delta}: need a value in (0, 1), e.g. below 1/(training cases per site)")
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise PrivacyConfigError(f"--dp_max_grad_norm {max_grad_norm}: need a finite value > 0")


def dpsgd_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = DPSGD_ACCOUNTANT
) -> float:
    """Epsilon spent after `steps` sampled-Gaussian steps, from an Opacus accountant ("rdp" or "prv")."""
    from opacus.accountants import create_accountant

    if steps == 0:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def plan_dpsgd(
    n_train: int,
    num_rounds: int,
    epochs_per_round: int,
    target_epsilon: float,
    delta: float | None,
    max_grad_norm: float,
    site: str = "the site",
) -> DPSGDPlan:
    """Calibrate the noise multiplier so that after all planned steps every training case is (target, delta)-DP."""
    from opacus.accountants.utils import get_noise_multiplier

    check_dpsgd_values(target_epsilon, delta, max_grad_norm)
    if num_rounds < 1 or epochs_per_round < 1:
        raise PrivacyConfigError(f"--num_rounds {num_rounds} / --aggregation_epochs {epochs_per_round}: need >= 1 each")
    if n_train < 2:
        raise PrivacyConfigError(
            f"{site} has {n_train} training case(s): DP-SGD samples each case with probability 1/n per step and "
            "needs at least 2 cases to protect any of them; use --dp_mechanism svt or more data"
        )
    if delta is None:
        delta = default_delta(n_train)
    elif delta >= 1.0 / n_train:
        raise PrivacyConfigError(
            f"--dp_delta {delta}: {site} has {n_train} training cases, so delta must be below 1/{n_train} = "
            f"{1.0 / n_train:.3g} (leave it out for the default 0.1/n)"
        )
    steps = num_rounds * epochs_per_round * n_train
    try:
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=1.0 / n_train,
            steps=steps,
            accountant=DPSGD_ACCOUNTANT,
        )
    except ValueError as e:
        raise PrivacyConfigError(
            f"--dp_target_epsilon {target_epsilon}: the {DPSGD_ACCOUNTANT} accountant finds no noise level reaching "
            f"it for {site} ({steps} steps at sampling rate 1/{n_train}, delta {delta:.3g}): {e} Raise the target "
            "or plan fewer rounds/epochs"
        ) from None
    return DPSGDPlan(n_train, num_rounds, epochs_per_round, target_epsilon, delta, max_grad_norm, float(sigma))


def dpsgd_round_record(plan: DPSGDPlan, round_num: int) -> dict:
    """The site's privacy after FL round `round_num` (0-based), recomputed from the plan and the round number.

    Recomputing instead of keeping a running accountant makes the figure survive a restart of the client process
    (the simulator swaps clients when --threads < --n_clients). It assumes the site trained in every round so far,
    which FedAvg here guarantees; were a round skipped, the figure would overstate the spend, never understate it.
    """
    steps_so_far = (round_num + 1) * plan.steps_per_round
    return {
        "round": int(round_num),
        "epsilon": dpsgd_epsilon(plan.noise_multiplier, plan.sample_rate, steps_so_far, plan.delta, plan.accountant),
        "delta": plan.delta,
        "target_epsilon": plan.target_epsilon,
        "noise_multiplier": plan.noise_multiplier,
        "max_grad_norm": plan.max_grad_norm,
        "sample_rate": plan.sample_rate,
        "n_train": plan.n_train,
        "steps_this_round": plan.steps_per_round,
        "steps_so_far": steps_so_far,
        "planned_total_steps": plan.total_steps,
        "accountant": plan.accountant,
    }


# ---------------------------------------------------------------------------------------------------------------
# The private training step
# ---------------------------------------------------------------------------------------------------------------
def secret_generator(device="cpu") -> torch.Generator:
    """A generator on ``device`` seeded from the operating system's entropy pool.

    Opacus draws the noise with ``torch.normal(..., device=<the gradient's device>, generator=g)``, so the noise
    generator must live where the model does (a CPU generator fails on CUDA, Opacus issue #263); the Poisson sampler
    draws on the CPU. Each gets its own generator."""
    import torch

    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def collate_or_none(batch: list):
    """MONAI's collate, or None for the empty batches Poisson sampling produces."""
    from monai.data import list_data_collate

    return list_data_collate(batch) if batch else None


def poisson_loader(dataset, plan: DPSGDPlan, generator: torch.Generator, num_workers: int = 0) -> DataLoader:
    """One epoch = plan.steps_per_epoch Poisson-sampled batches (the sampling the accountant assumes); generator is a
    CPU generator."""
    from monai.data import DataLoader
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    if len(dataset) != plan.n_train:
        raise ValueError(f"the plan is for {plan.n_train} training cases but the dataset has {len(dataset)}")
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset), sample_rate=plan.sample_rate, generator=generator, steps=plan.steps_per_epoch
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_or_none, num_workers=num_workers)


def make_dp_optimizer(
    optimizer: torch.optim.Optimizer, plan: DPSGDPlan, noise_generator: torch.Generator, secure_mode: bool = False
) -> DPOptimizer:
    """Wrap the site's optimizer: clip each case's gradient, add the calibrated noise, divide by 1 (the expected
    batch size: with Poisson sampling the actual size must not be used, it would leak how many cases were drawn).

    noise_generator must be on the model's device. secure_mode is Opacus's defence against floating-point attacks
    on the Gaussian noise (each noise value is the scaled sum of 4 draws)."""
    from opacus.optimizers import DPOptimizer

    return DPOptimizer(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=1,
        loss_reduction="mean",
        generator=noise_generator,
        secure_mode=secure_mode,
    )


def set_per_case_gradients(model, loss_fn, image: torch.Tensor | None, label: torch.Tensor | None) -> list[float]:
    """Store each case's gradient of its loss in ``p.grad_sample`` (cases x parameter shape), as DPOptimizer expects.

    An empty batch gets 0-row gradients, so the step adds pure noise (the accountant counts it like any other step).
    Returns each case's loss."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    n_cases = 0 if image is None else image.shape[0]
    per_param: list[list[torch.Tensor]] = [[] for _ in params]
    losses = []
    for i in range(n_cases):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(image[i : i + 1]), label[i : i + 1])
        loss.backward()
        losses.append(float(loss.detach()))
        for slot, p in zip(per_param, params):
            slot.append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    for slot, p in zip(per_param, params):
        p.grad_sample = torch.stack(slot) if slot else torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    return losses


def add_data_independent_gradient(model, extra_loss) -> None:
    """Add the gradient of ``extra_loss(model)`` to the (already clipped and noised) gradients.

    FedProx's proximal term depends only on the weights, not on any patient, so it costs no privacy: applied here,
    after clipping, it acts once per step (also on empty Poisson steps) and uses none of the clipping budget."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    for p, g in zip(params, torch.autograd.grad(extra_loss(model), params, allow_unused=True)):
        if g is not None:
            p.grad = g.detach() if p.grad is None else p.grad + g.detach()


def private_training(dataset, optimizer, plan: DPSGDPlan, device, num_workers: int = 0, secure_mode: bool = False):
    """The Poisson-sampling loader (CPU generator) and the clipping/noising optimizer (noise generator on the model's
    device), each generator seeded from the operating system."""
    loader = poisson_loader(dataset, plan, secret_generator("cpu"), num_workers=num_workers)
    return loader, make_dp_optimizer(optimizer, plan, secret_generator(device), secure_mode)


def private_step(model, optimizer: DPOptimizer, loss_fn, image, label, extra_loss=None) -> list[float]:
    """One DP-SGD step on the cases drawn (possibly none); returns their losses."""
    optimizer.zero_grad(set_to_none=True)
    losses = set_per_case_gradients(model, loss_fn, image, label)
    if optimizer.pre_step():  # clip each case, sum, add noise, scale: p.grad is now the private gradient
        if extra_loss is not None:
            add_data_independent_gradient(model, extra_loss)
        optimizer.original_optimizer.step()
    return losses


def train_one_round(
    model, global_model, loader, optimizer: DPOptimizer, loss_fn, fedprox, epochs: int, device: torch.device
) -> tuple[int, float]:
    """DP-SGD local training; returns (optimiser steps, mean loss over the cases drawn). No mixed precision."""
    model.train()
    extra = (lambda m: fedprox(m, global_model)) if fedprox is not None else None
    steps, losses = 0, []
    for _ in range(epochs):
        for batch in loader:
            image = label = None
            if batch is not None:
                image, label = batch["image"].to(device), batch["label"].to(device)
            losses += private_step(model, optimizer, loss_fn, image, label, extra)
            steps += 1
    optimizer.zero_grad(set_to_none=True)
    return steps, sum(losses) / max(len(losses), 1)
