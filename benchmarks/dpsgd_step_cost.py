"""What DP-SGD costs per local step against non-private training, on this machine (prints figures, asserts nothing).

A non-private step is the client's: one forward/backward pass over the batch and an Adam step. A DP-SGD step is
brats_fl/privacy/dpsgd.py's: one forward/backward pass per case drawn (per-case gradients), clipping, Gaussian
noise on every parameter, and the Adam step. Inputs are random tensors of the crop size, so data loading is left
out of both.

    python -m benchmarks.dpsgd_step_cost                       # the demo's model and crop
    python -m benchmarks.dpsgd_step_cost --roi_size 224 224 144 --steps 3   # the paper's crop (slow on a CPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import brats_fl.pipeline as bp
from brats_fl.privacy import dpsgd
from brats_fl.privacy.dpsgd import DPSGDPlan
from brats_fl.settings import roi_size_problem
from model import BratsSegResNet, count_parameters


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_filters", type=int, default=16, help="SegResNet base width (default: 16)")
    p.add_argument(
        "--roi_size",
        type=int,
        nargs=3,
        default=[48, 48, 32],
        metavar=("X", "Y", "Z"),
        help="training crop, multiples of 8 (default: 48 48 32)",
    )
    p.add_argument(
        "--batch_sizes",
        type=int,
        nargs="+",
        default=[1, 2],
        help="cases per step to time; Poisson sampling with expected batch 1 draws 1 case 37%% of the "
        "time and 2 or more 26%% (default: 1 2)",
    )
    p.add_argument("--steps", type=int, default=6, help="timed steps per configuration, >= 1 (default: 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first, >= 0 (default: 2)")
    p.add_argument("--torch_threads", type=int, default=0, help="torch CPU threads; 0 = torch's default (default: 0)")
    return p


def check_args(args: argparse.Namespace) -> str | None:
    """The first bad flag, as one line, or None."""
    problem = roi_size_problem(args.roi_size)
    if problem:
        return problem
    if args.init_filters < 8 or args.init_filters % 8:
        return f"--init_filters {args.init_filters}: need a positive multiple of 8"
    for flag, value, least in (
        ("--steps", args.steps, 1),
        ("--warmup", args.warmup, 0),
        ("--torch_threads", args.torch_threads, 0),
        ("--batch_sizes", min(args.batch_sizes), 1),
    ):
        if value < least:
            return f"{flag} {value}: need >= {least}"
    return None


def time_steps(steps: dict, n_warmup: int, n_steps: int) -> dict[str, float]:
    """Median seconds per step of each named step function, the functions taking turns so that other load on the
    machine hits them alike."""
    for _ in range(n_warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n_steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def make_steps(args: argparse.Namespace, batch: int):
    torch.manual_seed(0)
    image = torch.randn(batch, 4, *args.roi_size)
    label = (torch.rand(batch, 3, *args.roi_size) > 0.7).float()
    loss_fn = bp.make_loss()

    plain = BratsSegResNet(init_filters=args.init_filters).train()
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-4, weight_decay=1e-5)

    def plain_step():
        plain_opt.zero_grad(set_to_none=True)
        loss_fn(plain(image), label).backward()
        plain_opt.step()

    private = BratsSegResNet(init_filters=args.init_filters).train()
    plan = DPSGDPlan(
        n_train=60,
        num_rounds=1,
        epochs_per_round=1,
        target_epsilon=8.0,
        delta=1e-3,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
    )
    dp_opt = dpsgd.make_dp_optimizer(
        torch.optim.Adam(private.parameters(), lr=1e-4, weight_decay=1e-5), plan, dpsgd.secret_generator()
    )

    def dp_step():
        dp_opt.zero_grad(set_to_none=True)
        dpsgd.set_per_case_gradients(private, loss_fn, image, label)
        dp_opt.step()

    return plain_step, dp_step


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    n_params = count_parameters(BratsSegResNet(init_filters=args.init_filters))
    print(
        f"SegResNet init_filters {args.init_filters} ({n_params:,} parameters), crop "
        f"{'x'.join(map(str, args.roi_size))}, CPU, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}; median of {args.steps} steps after {args.warmup} warm-up steps, the two kinds "
        "alternating"
    )
    print(f"{'cases/step':>10}  {'non-private s':>13}  {'DP-SGD s':>9}  {'DP / non-private':>16}")
    for batch in args.batch_sizes:
        plain_step, dp_step = make_steps(args, batch)
        t = time_steps({"plain": plain_step, "dp": dp_step}, args.warmup, args.steps)
        print(f"{batch:>10}  {t['plain']:>13.3f}  {t['dp']:>9.3f}  {t['dp'] / t['plain']:>16.2f}")
    empty = time_steps(
        {"plain": make_empty_step(args, False), "secure": make_empty_step(args, True)}, args.warmup, args.steps
    )
    print(f"{0:>10}  {'-':>13}  {empty['plain']:>9.3f}  (empty Poisson batch: noise and Adam step only)")
    print(f"{0:>10}  {'-':>13}  {empty['secure']:>9.3f}  (the same with --dp_secure_mode: 4 noise draws per value)")
    return 0


def make_empty_step(args: argparse.Namespace, secure_mode: bool):
    """A DP-SGD step on an empty batch (37% of steps at expected batch 1): no forward pass, pure noise."""
    model = BratsSegResNet(init_filters=args.init_filters).train()
    plan = DPSGDPlan(60, 1, 1, 8.0, 1e-3, 1.0, 1.0)
    opt = dpsgd.make_dp_optimizer(
        torch.optim.Adam(model.parameters(), lr=1e-4), plan, dpsgd.secret_generator(), secure_mode
    )

    def step():
        opt.zero_grad(set_to_none=True)
        dpsgd.set_per_case_gradients(model, None, None, None)
        opt.step()

    return step


if __name__ == "__main__":
    sys.exit(main())
