"""One federated client (any site): MONAI training of BratsSegResNet on the NVFlare Client API.

Every round: receive the global model, validate it on the shared validation cases, train ``aggregation_epochs``
local epochs, and send the weights back (the Client API turns them into a weight difference, as job.py asks) with
the validation Dice and the number of local steps, which FedAvg uses as the aggregation weight.

The imaging pipeline (transforms, loss, Dice, sliding-window inference) lives in brats_pipeline.py, shared with
result_stat/ and the tests. With ``--dp_mechanism dpsgd`` local training is DP-SGD (dpsgd.py, calibrated by
privacy.py) and the update carries the site's spent epsilon in its metadata; with ``svt`` NVFlare's filter, outside
this script, perturbs the update after it is sent.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

import nvflare.client as flare
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.client.tracking import SummaryWriter

import brats_pipeline as bp
import dpsgd
import privacy
from model import BratsSegResNet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="BraTS federated client (started by job.py through NVFlare)")
    p.add_argument("--dataset_base_dir", required=True, help="root that datalist paths are relative to")
    p.add_argument("--datalist_json_path", required=True, help="folder holding site-N.json and site-All.json")
    p.add_argument("--centralised", action="store_true", help="train on site-All.json (the 1-client baseline)")
    p.add_argument("--aggregation_epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--fedproxloss_mu", type=float, default=0.0, help="FedProx weight; 0 disables the term")
    p.add_argument("--cache_dataset", type=float, default=0.0, help="fraction of training cases cached in memory")
    p.add_argument("--roi_size", type=int, nargs=3, default=[224, 224, 144])
    p.add_argument("--infer_roi_size", type=int, nargs=3, default=[240, 240, 160])
    p.add_argument("--init_filters", type=int, default=16)
    p.add_argument("--no_amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--torch_threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--num_workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_rounds", type=int, default=1, help="planned FL rounds (DP-SGD calibrates for all of them)")
    p.add_argument("--dp_mechanism", choices=("none", *privacy.MECHANISMS), default="none",
                   help="privacy mechanism of the job: svt (an NVFlare filter after this script) or dpsgd (here)")
    p.add_argument("--dp_target_epsilon", type=float, default=8.0, help="DP-SGD: epsilon after all rounds")
    p.add_argument("--dp_delta", type=float, default=None, help="DP-SGD: delta (default: 0.1 / training cases)")
    p.add_argument("--dp_max_grad_norm", type=float, default=1.0, help="DP-SGD: per-case gradient clipping bound")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def site_datalist_path(args: argparse.Namespace, site_name: str) -> Path:
    name = "site-All" if args.centralised else site_name
    return Path(args.datalist_json_path) / f"{name}.json"


def build_datasets(args: argparse.Namespace, datalist_path: Path):
    datalist = bp.read_datalist(datalist_path)
    et_label = bp.datalist_et_label(datalist)
    train_entries = bp.resolve_entries(datalist["training"], args.dataset_base_dir)
    val_entries = bp.resolve_entries(datalist["validation"], args.dataset_base_dir)
    train_ds = bp.make_dataset(train_entries, bp.train_transforms(args.roi_size, et_label), args.cache_dataset)
    val_ds = bp.make_dataset(val_entries, bp.val_transforms(et_label), args.cache_dataset)
    return train_ds, val_ds


def keep_dp_noise_secret() -> None:
    """Reseed NumPy's global generator from the OS after seed_everything: NVFlare's SVT filter runs in this process
    and draws its Laplace noise from that generator, which must not be reproducible from the public --seed.
    (MONAI's augmentation is seeded through torch, so training stays reproducible.)"""
    np.random.seed(None)


def setup_dpsgd(args: argparse.Namespace, site_name: str, train_ds, optimizer):
    """The same calibration job.py made before the run, a Poisson-sampling loader and the clipping/noising optimizer
    (sampling and noise from secret generators)."""
    plan = privacy.plan_dpsgd(len(train_ds), args.num_rounds, args.aggregation_epochs, args.dp_target_epsilon,
                              args.dp_delta, args.dp_max_grad_norm, site=site_name)
    secret = dpsgd.secret_generator()
    loader = dpsgd.poisson_loader(train_ds, plan, secret, num_workers=args.num_workers)
    print(f"[{site_name}] DP-SGD: noise multiplier {plan.noise_multiplier:.4g}, sampling rate {plan.sample_rate:.3g}, "
          f"{plan.steps_per_round} steps per round, delta {plan.delta:.3g}", flush=True)
    return plan, loader, dpsgd.make_dp_optimizer(optimizer, plan, secret)


def train_one_round(model, global_model, loader, optimizer, loss_fn, fedprox, epochs, device, scaler) -> tuple[int, float]:
    """Local training; returns (number of optimiser steps, mean loss)."""
    model.train()
    steps, loss_sum = 0, 0.0
    for _ in range(epochs):
        for batch in loader:
            image, label = batch["image"].to(device), batch["label"].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, enabled=scaler.is_enabled()):
                loss = loss_fn(model(image), label)
                if fedprox is not None:
                    loss = loss + fedprox(model, global_model)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            steps += 1
            loss_sum += float(loss.detach())
    return steps, loss_sum / max(steps, 1)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A gradient-free snapshot of the received global model."""
    snapshot = copy.deepcopy(model).eval()
    for p in snapshot.parameters():
        p.requires_grad_(False)
    return snapshot


def log_round(writer: SummaryWriter, round_num: int, metrics: dict[str, float], train_loss: float, steps: int) -> None:
    """TensorBoard scalars, one point per round (global step = FL round)."""
    for key, value in metrics.items():
        if not math.isnan(value):
            writer.add_scalar(key, value, global_step=round_num)
    writer.add_scalar("train_loss", train_loss, global_step=round_num)
    writer.add_scalar("train_steps", steps, global_step=round_num)


def main() -> None:
    args = parse_args()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    flare.init()
    site_name = flare.get_site_name()
    seed_everything(args.seed + sum(site_name.encode()))
    device = bp.select_device()
    use_amp = device.type == "cuda" and not args.no_amp

    if args.dp_mechanism != "none":
        keep_dp_noise_secret()

    train_ds, val_ds = build_datasets(args, site_datalist_path(args, site_name))
    train_loader = bp.make_loader(train_ds, shuffle=True, num_workers=args.num_workers)
    val_loader = bp.make_loader(val_ds, shuffle=False, num_workers=args.num_workers)
    model = BratsSegResNet(init_filters=args.init_filters).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, weight_decay=1e-5)
    plan = None
    if args.dp_mechanism == "dpsgd":
        plan, train_loader, optimizer = setup_dpsgd(args, site_name, train_ds, optimizer)
        use_amp = False  # per-case gradients are taken in full precision
    loss_fn = bp.make_loss()
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    fedprox = None
    if args.fedproxloss_mu > 0:
        from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

        fedprox = PTFedProxLoss(mu=args.fedproxloss_mu)
    writer = SummaryWriter()

    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:
            break
        round_num = input_model.current_round
        model.load_state_dict(input_model.params)
        metrics = bp.evaluate_dice(model, val_loader, device, args.infer_roi_size, use_amp=use_amp)
        global_model = frozen_copy(model) if fedprox is not None else None  # FedProx pulls towards it

        started = time.perf_counter()
        meta = {}
        if plan is None:
            steps, train_loss = train_one_round(
                model, global_model, train_loader, optimizer, loss_fn, fedprox, args.aggregation_epochs, device, scaler
            )
        else:
            steps, train_loss = dpsgd.train_one_round(
                model, global_model, train_loader, optimizer, loss_fn, fedprox, args.aggregation_epochs, device
            )
            meta[privacy.DPSGD_META] = privacy.dpsgd_round_record(plan, round_num)
        log_round(writer, round_num, metrics, train_loss, steps)
        privacy_note = f", epsilon {meta[privacy.DPSGD_META]['epsilon']:.4g} spent" if plan else ""
        print(f"[{site_name}] round {round_num}: global model val_dice {metrics['val_dice']:.4f}, "
              f"{steps} local steps in {time.perf_counter() - started:.1f} s, train loss {train_loss:.4f}"
              f"{privacy_note}", flush=True)

        flare.send(
            flare.FLModel(
                params={k: v.detach().cpu() for k, v in model.state_dict().items()},
                metrics={k: v for k, v in metrics.items() if not math.isnan(v)},
                meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps, **meta},
            )
        )


if __name__ == "__main__":
    main()
