"""The GPU measurements the paper-scale runs depend on, in one command (run it through benchmarks/gpu_check.sh).

1. seconds per training step and peak GPU memory of SegResNet-16 at 224x224x144, batch 1, fp32 and mixed precision;
2. seconds of sliding-window inference per 240x240x155 volume (the validation of one case);
3. three DP-SGD steps on the GPU (noise drawn on the device: the generator fix of issue 9), seconds per step;
4. benchmarks/round_time.py with 4 sites on one GPU at the paper's settings (synthetic 240x240x155 cases);

then projects the wall time of the paper's 600-round centralised, federated and DP-SGD runs from the per-step
figures (a projection, not a measurement: it assumes data loading keeps up, which the cache and workers are for).

    benchmarks/gpu_check.sh                  # on a machine with an NVIDIA GPU
    python -m benchmarks.gpu_check --smoke   # a tiny CPU run that checks the script works
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

import brats_fl.pipeline as bp
from brats_fl.privacy import dpsgd
from brats_fl.privacy.dpsgd import DPSGDPlan
from brats_fl.settings import REPO_DIR
from model import BratsSegResNet

PAPER = {"roi": (224, 224, 144), "volume": (240, 240, 155), "window": (240, 240, 160), "width": 16}
SMOKE = {"roi": (32, 32, 24), "volume": (40, 40, 30), "window": (32, 32, 24), "width": 8}
PAPER_CASES = {"train": 242, "validation": 43, "rounds": 600}  # the paper's split: 242 training, 43 validation


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement (default: 10)")
    p.add_argument(
        "--round_time_rounds",
        type=int,
        default=3,
        help="--num_rounds of each benchmarks.round_time run; 0 skips it (default: 3)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is, to test the script")
    return p


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, n: int, device: torch.device, warmup: int = 2) -> float:
    """Median seconds of n calls after warm-up calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def training_step(sizes: dict, device: torch.device, amp: bool):
    """One optimiser step of the sites' loop (Dice loss, Adam, GradScaler under AMP) on a random crop."""
    model = BratsSegResNet(init_filters=sizes["width"]).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    loss_fn = bp.make_loss()
    image = torch.randn(1, 4, *sizes["roi"], device=device)
    label = (torch.rand(1, 3, *sizes["roi"], device=device) > 0.7).float()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, enabled=amp):
            loss = loss_fn(model(image), label)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def inference(sizes: dict, device: torch.device, amp: bool):
    model = BratsSegResNet(init_filters=sizes["width"]).to(device).eval()
    volume = torch.randn(1, 4, *sizes["volume"], device=device)
    return lambda: bp.predict_regions(model, volume, sizes["window"], use_amp=amp)


def dpsgd_step(sizes: dict, device: torch.device):
    """A private step with one case, the noise generator on the device (fails on CUDA with a CPU generator)."""
    model = BratsSegResNet(init_filters=sizes["width"]).to(device).train()
    plan = DPSGDPlan(60, 1, 1, 8.0, 1e-3, 1.0, 1.0)
    cases = [{"image": torch.zeros(4, *sizes["roi"]), "label": torch.zeros(3, *sizes["roi"])}] * plan.n_train
    _, optimizer = dpsgd.private_training(cases, torch.optim.Adam(model.parameters(), lr=1e-4), plan, device)
    image = torch.randn(1, 4, *sizes["roi"], device=device)
    label = (torch.rand(1, 3, *sizes["roi"], device=device) > 0.7).float()
    loss_fn = bp.make_loss()
    return lambda: dpsgd.private_step(model, optimizer, loss_fn, image, label)


def measure(args: argparse.Namespace, device: torch.device, sizes: dict) -> dict[str, float]:
    figures = {}
    for amp in (False, True):
        name = "amp" if amp else "fp32"
        reset_peak(device)
        figures[f"step_{name}"] = timed(training_step(sizes, device, amp and device.type == "cuda"), args.steps, device)
        figures[f"peak_gib_{name}"] = peak_gib(device)
        print(
            f"  training step {name}: {figures[f'step_{name}']:.3f} s, "
            f"peak memory {figures[f'peak_gib_{name}']:.2f} GiB",
            flush=True,
        )
    figures["inference"] = timed(inference(sizes, device, device.type == "cuda"), max(3, args.steps // 3), device, 1)
    print(f"  sliding-window inference of one volume: {figures['inference']:.3f} s", flush=True)
    figures["dpsgd_step"] = timed(dpsgd_step(sizes, device), 3, device, warmup=1)
    print(f"  DP-SGD step (one case, noise drawn on {device.type}): {figures['dpsgd_step']:.3f} s", flush=True)
    return figures


def projections(figures: dict[str, float]) -> dict[str, float]:
    """Hours of the paper's 600-round runs if every step and validation took the measured time, loading overlapped."""
    train, val, rounds = PAPER_CASES["train"], PAPER_CASES["validation"], PAPER_CASES["rounds"]
    validation = val * figures["inference"]  # once per round (4 identical validations in the paper's workflow)
    return {
        "centralised (1 site, 242 steps/round, AMP)": rounds * (train * figures["step_amp"] + validation) / 3600,
        "federated (4 sites on one GPU, 242 steps/round in all, AMP)": rounds
        * (train * figures["step_amp"] + validation)
        / 3600,
        "federated, every site validating (the paper's workflow)": rounds
        * (train * figures["step_amp"] + 4 * validation)
        / 3600,
        "federated + DP-SGD (fp32 per-case steps)": rounds * (train * figures["dpsgd_step"] + validation) / 3600,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (no CUDA device visible)"
    if device.type != "cuda" and not args.smoke:
        print(
            "error: no CUDA device is visible; run on a GPU machine, or --smoke for a tiny CPU check", file=sys.stderr
        )
        return 2
    sizes = SMOKE if args.smoke else PAPER
    print(
        f"GPU check on {name}, torch {torch.__version__}: SegResNet-{sizes['width']}, crop "
        f"{'x'.join(map(str, sizes['roi']))}, volume {'x'.join(map(str, sizes['volume']))}, batch 1",
        flush=True,
    )
    figures = measure(args, device, sizes)
    print(f"Projected wall time of the paper's 600-round runs on {name} (a projection from the step times above):")
    for what, hours in projections(figures).items():
        print(f"  {what}: {hours:.1f} h")
    if args.round_time_rounds:
        command = [sys.executable, "-m", "benchmarks.round_time", "--num_rounds", str(args.round_time_rounds)]
        command += ["--smoke"] if args.smoke else ["--paper_settings", "--gpu", "0", "--n_cases", "10"]
        print(f"Round time, 4 sites on one GPU: {' '.join(command[1:])}", flush=True)
        return subprocess.run(command, cwd=REPO_DIR).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
