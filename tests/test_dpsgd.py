"""DP-SGD training pieces on hand-made inputs: per-case gradients, clipping, noise, Poisson batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import brats_fl.pipeline as bp
from brats_fl.privacy import dpsgd
from brats_fl.privacy.dpsgd import DPSGDPlan
from model import BratsSegResNet


def plan(n_train: int = 4, noise_multiplier: float = 0.0, max_grad_norm: float = 1.0) -> DPSGDPlan:
    return DPSGDPlan(
        n_train=n_train,
        num_rounds=1,
        epochs_per_round=1,
        target_epsilon=8.0,
        delta=0.01,
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier,
    )


def linear_model(w=(1.0, 2.0)) -> torch.nn.Linear:
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([w]))
    return model


def sum_loss(output, _label):
    return output.sum()  # d/dw = the case's input: per-case gradients are known exactly


def test_per_case_gradients_are_each_cases_own_gradient():
    model = linear_model()
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [-1.0, 0.0]])
    losses = dpsgd.set_per_case_gradients(model, sum_loss, x, torch.zeros(3, 1))
    assert torch.allclose(model.weight.grad_sample, x.unsqueeze(1))  # 3 cases x (1 x 2) weight
    assert losses == pytest.approx([11.0, 1.1, -1.0])
    assert model.weight.grad is None  # only the per-case gradients are left for the DP optimizer


def test_dp_step_clips_each_case_then_sums_and_divides_by_the_expected_batch():
    model = linear_model()
    opt = dpsgd.make_dp_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), plan(), dpsgd.secret_generator())
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # gradient norms 5 (clipped to 1) and 0.5 (kept)
    dpsgd.set_per_case_gradients(model, sum_loss, x, torch.zeros(2, 1))
    opt.step()
    # w - (0.6, 0.8) - (0.3, 0.4): the expected batch size is 1, so the sum is not divided by the 2 cases drawn
    assert torch.allclose(model.weight, torch.tensor([[0.1, 0.8]]), atol=1e-5)


def test_an_empty_batch_is_a_step_of_pure_noise():
    quiet = linear_model()
    opt = dpsgd.make_dp_optimizer(torch.optim.SGD(quiet.parameters(), lr=1.0), plan(), dpsgd.secret_generator())
    dpsgd.set_per_case_gradients(quiet, sum_loss, None, None)
    assert quiet.weight.grad_sample.shape == (0, 1, 2)
    opt.step()
    assert torch.equal(quiet.weight, torch.tensor([[1.0, 2.0]]))  # no noise configured: nothing moves

    noisy = linear_model()
    opt = dpsgd.make_dp_optimizer(
        torch.optim.SGD(noisy.parameters(), lr=1.0), plan(noise_multiplier=1.0), dpsgd.secret_generator()
    )
    dpsgd.set_per_case_gradients(noisy, sum_loss, None, None)
    opt.step()
    assert not torch.equal(noisy.weight, torch.tensor([[1.0, 2.0]]))


def test_noise_has_the_calibrated_standard_deviation():
    model = torch.nn.Linear(1000, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = dpsgd.make_dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        plan(noise_multiplier=1.5, max_grad_norm=0.2),
        dpsgd.secret_generator(),
    )
    dpsgd.set_per_case_gradients(model, sum_loss, None, None)
    opt.step()
    assert float(model.weight.detach().std()) == pytest.approx(1.5 * 0.2, rel=0.1)  # sd = noise multiplier x clip bound


def test_secure_mode_noise_has_the_calibrated_standard_deviation_too():
    model = torch.nn.Linear(1000, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = dpsgd.make_dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        plan(noise_multiplier=1.5, max_grad_norm=0.2),
        dpsgd.secret_generator(),
        secure_mode=True,
    )
    assert opt.secure_mode  # Opacus's floating-point-attack defence: each value is the scaled sum of 4 draws
    dpsgd.set_per_case_gradients(model, sum_loss, None, None)
    opt.step()
    assert float(model.weight.detach().std()) == pytest.approx(1.5 * 0.2, rel=0.1)


def test_sampler_and_noise_get_their_own_generators_and_noise_lives_on_the_model_device(monkeypatch):
    """Opacus draws the noise with torch.normal(device=<the gradient's device>, generator=g): a CPU generator fails
    on CUDA. The sampler's generator stays on the CPU, the noise generator follows the model."""
    created = []

    class RecordingGenerator:
        def __init__(self, device="cpu"):
            self.device = torch.device(device)
            created.append(self)

        def manual_seed(self, seed):
            return self

    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    cases = [{"image": torch.zeros(1, 2), "label": torch.zeros(1, 2)} for _ in range(4)]
    loader, optimizer = dpsgd.private_training(
        cases, torch.optim.SGD(linear_model().parameters(), lr=1.0), plan(), torch.device("cuda", 0)
    )
    assert [g.device for g in created] == [torch.device("cpu"), torch.device("cuda", 0)]
    assert loader.batch_sampler.generator is created[0] and optimizer.generator is created[1]


def test_fedprox_pulls_once_per_step_outside_the_clipping():
    """The proximal term depends on no patient: it is added after clipping and noise, once per step, also on an
    empty Poisson step, and uses none of the clipping budget."""
    global_model = linear_model((0.0, 0.0))
    mu = 0.5

    def prox(m):
        return 0.5 * mu * ((m.weight - global_model.weight) ** 2).sum()  # gradient mu (w - w_global)

    model = linear_model((1.0, 2.0))
    opt = dpsgd.make_dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), plan(max_grad_norm=1.0), dpsgd.secret_generator()
    )
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # clipped to (0.6, 0.8) and kept as (0.3, 0.4)
    dpsgd.private_step(model, opt, sum_loss, x, torch.zeros(2, 1), prox)
    # w - [(0.6, 0.8) + (0.3, 0.4)] - mu w: the pull is applied once, not once per case, and is not clipped
    assert torch.allclose(model.weight, torch.tensor([[1.0 - 0.9 - 0.5, 2.0 - 1.2 - 1.0]]), atol=1e-5)

    empty = linear_model((1.0, 2.0))
    opt = dpsgd.make_dp_optimizer(torch.optim.SGD(empty.parameters(), lr=1.0), plan(), dpsgd.secret_generator())
    dpsgd.private_step(empty, opt, sum_loss, None, None, prox)
    assert torch.allclose(empty.weight, torch.tensor([[0.5, 1.0]]))  # an empty step still pulls towards the global


def test_secret_generators_do_not_repeat():
    a, b = dpsgd.secret_generator(), dpsgd.secret_generator()
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))


def test_poisson_loader_draws_every_case_independently():
    cases = [{"image": torch.full((1, 2), float(i)), "label": torch.zeros(1, 2)} for i in range(8)]
    loader = dpsgd.poisson_loader(cases, plan(n_train=8), dpsgd.secret_generator())
    sizes = []
    for _ in range(100):
        batches = list(loader)
        assert len(batches) == 8  # one epoch = n steps, whatever was drawn
        sizes += [0 if b is None else b["image"].shape[0] for b in batches]
    counts = np.bincount(sizes)
    assert counts[0] > 0 and len(counts) > 2  # empty batches and batches of several cases both occur
    assert np.mean(sizes) == pytest.approx(1.0, abs=0.15)  # expected batch size n x 1/n = 1
    with pytest.raises(ValueError, match="plan is for 5"):
        dpsgd.poisson_loader(cases, plan(n_train=5), dpsgd.secret_generator())


def test_one_dp_round_trains_segresnet_on_synthetic_cases(tiny_federation):
    data_dir, datalist_dir = tiny_federation
    datalist = bp.read_datalist(datalist_dir / "site-1.json")
    train = bp.make_dataset(bp.resolve_entries(datalist["training"], data_dir), bp.training_steps([32, 32, 24]))
    torch.manual_seed(0)
    model = BratsSegResNet(init_filters=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = plan(n_train=len(train), noise_multiplier=1.0)
    loader, opt = dpsgd.private_training(train, torch.optim.Adam(model.parameters(), lr=1e-3), p, torch.device("cpu"))
    steps, loss = dpsgd.train_one_round(model, None, loader, opt, bp.make_loss(), None, 1, torch.device("cpu"))
    assert steps == len(train)
    assert 0.0 <= loss <= 1.0  # mean Dice loss of the cases drawn (0 if none was drawn)
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # noise reaches every tensor
