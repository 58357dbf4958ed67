"""One federated site: MONAI training of BratsSegResNet on the NVFlare Client API.

Every round: receive the global model, validate it on the validation cases, train ``aggregation_epochs`` local
epochs, and send the weights back (the Client API turns them into a weight difference, as job.py asks) with the
validation Dice and the number of local steps, which FedAvg uses as the aggregation weight.

Its settings come from ``brats_settings.json``, which job.py ships next to this file (brats_fl/settings.py defines
them). The imaging pipeline (transforms, loss, Dice, sliding-window inference) is brats_fl/pipeline.py, shared with
the evaluation and the tests. With DP-SGD, local training is brats_fl/privacy/dpsgd.py and the update carries the
site's spent epsilon in its metadata; with SVT, NVFlare's filter perturbs the update after this script sends it.
"""

from __future__ import annotations

import copy
import math
import random
import time
from pathlib import Path

import numpy as np
import nvflare.client as flare
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.client.tracking import SummaryWriter

import brats_fl.pipeline as bp
from brats_fl.cache import CaseCache
from brats_fl.privacy import DPSGD_META, dpsgd
from brats_fl.settings import SETTINGS_FILE, TrainingSettings
from model import BratsSegResNet

LOCAL_EVENTS_DIR = "local_tb_events"  # with DP: the site's training statistics, kept in the site's job folder


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def site_datalist_path(settings: TrainingSettings, site_name: str) -> Path:
    name = "site-All" if settings.centralised else site_name
    return Path(settings.datalist_json_path) / f"{name}.json"


def build_datasets(settings: TrainingSettings, datalist_path: Path, validates: bool):
    """The site's training cases, and its validation cases if it validates; preprocessed cases come from the disk
    cache shared by every site and round on this machine when the settings name one."""
    datalist = bp.read_datalist(datalist_path)
    et_label = bp.datalist_et_label(datalist)
    cache = CaseCache(settings.cache_dir) if settings.cache_dir else None

    def dataset(part: str, steps):
        entries = bp.resolve_entries(datalist[part], settings.dataset_base_dir)
        return bp.make_dataset(entries, steps, cache, settings.cache_dataset)

    train_ds = dataset("training", bp.training_steps(settings.roi_size, et_label))
    val_ds = dataset("validation", bp.validation_steps(et_label)) if validates else None
    return train_ds, val_ds


def validates_here(settings: TrainingSettings, site_name: str) -> bool:
    """Every site validates the same global model each round; on the same shared cases that is the same figure N
    times, so by default one site does it and the others send no Dice (FedAvg then averages over that site alone)."""
    return settings.validate_at == "every_site" or site_name == settings.validating_site


def validate(model, val_loader, device, settings: TrainingSettings, use_amp: bool) -> dict[str, float]:
    """Dice of the received global model on the site's validation cases; {} at a site that does not validate (an
    empty dict, not None: NVFlare's FedAvg then leaves the site out of the round's mean instead of dropping it)."""
    if val_loader is None:
        return {}
    metrics = bp.evaluate_dice(model, val_loader, device, settings.infer_roi_size, use_amp=use_amp)
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def keep_dp_noise_secret() -> None:
    """Reseed NumPy's global generator from the OS after seed_everything: NVFlare's SVT filter runs in this process
    and draws its Laplace noise from that generator, which must not be reproducible from the public --seed.
    (MONAI's augmentation is seeded through torch, so training stays reproducible.)"""
    np.random.seed(None)


def setup_dpsgd(settings: TrainingSettings, site_name: str, train_ds, optimizer, device):
    """The same calibration job.py made before the run, a Poisson-sampling loader and the clipping/noising optimizer
    (sampling and noise from secret generators)."""
    plan = dpsgd.plan_dpsgd(
        len(train_ds),
        settings.num_rounds,
        settings.aggregation_epochs,
        settings.dp_target_epsilon,
        settings.dp_delta,
        settings.dp_max_grad_norm,
        site=site_name,
    )
    loader, dp_optimizer = dpsgd.private_training(
        train_ds, optimizer, plan, device, settings.num_workers, settings.dp_secure_mode
    )
    print(
        f"[{site_name}] DP-SGD: noise multiplier {plan.noise_multiplier:.4g}, sampling rate {plan.sample_rate:.3g}, "
        f"{plan.steps_per_round} steps per round, delta {plan.delta:.3g}, secure mode {settings.dp_secure_mode}",
        flush=True,
    )
    return plan, loader, dp_optimizer


def train_one_round(
    model, global_model, loader, optimizer, loss_fn, fedprox, epochs, device, scaler
) -> tuple[int, float]:
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


def training_statistics_writer(settings: TrainingSettings, to_server: SummaryWriter):
    """Where train_loss and train_steps go. They are computed from the site's training cases and no privacy mechanism
    protects them, so with DP they stay in the site's own job folder (local_tb_events/, next to the app); without
    DP they go to the server's TensorBoard like the validation Dice."""
    if not settings.dp_mechanism:
        return to_server
    from torch.utils.tensorboard import SummaryWriter as LocalSummaryWriter

    return LocalSummaryWriter(log_dir=str(Path(__file__).resolve().parents[2] / LOCAL_EVENTS_DIR))


def log_round(to_server, training_writer, round_num: int, metrics: dict[str, float], train_loss: float, steps: int):
    """TensorBoard scalars, one point per round (global step = FL round): the validation Dice of the received global
    model to the server, the training statistics to training_writer."""
    for key, value in metrics.items():
        to_server.add_scalar(key, value, global_step=round_num)
    training_writer.add_scalar("train_loss", train_loss, global_step=round_num)
    training_writer.add_scalar("train_steps", steps, global_step=round_num)


def main() -> None:
    settings = TrainingSettings.read(Path(__file__).with_name(SETTINGS_FILE))
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)

    flare.init()
    site_name = flare.get_site_name()
    seed_everything(settings.seed + sum(site_name.encode()))
    device = bp.select_device()
    use_amp = device.type == "cuda" and settings.amp

    if settings.dp_mechanism:
        keep_dp_noise_secret()

    train_ds, val_ds = build_datasets(
        settings, site_datalist_path(settings, site_name), validates_here(settings, site_name)
    )
    loader_options = {"num_workers": settings.num_workers, "pin_memory": device.type == "cuda"}
    train_loader = bp.make_loader(train_ds, shuffle=True, **loader_options)
    val_loader = bp.make_loader(val_ds, shuffle=False, **loader_options) if val_ds is not None else None
    model = BratsSegResNet(init_filters=settings.init_filters).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=1e-5)
    plan = None
    if settings.dp_mechanism == "dpsgd":
        plan, train_loader, optimizer = setup_dpsgd(settings, site_name, train_ds, optimizer, device)
        use_amp = False  # per-case gradients are taken in full precision
    loss_fn = bp.make_loss()
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    fedprox = None
    if settings.fedproxloss_mu > 0:
        from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

        fedprox = PTFedProxLoss(mu=settings.fedproxloss_mu)
    to_server = SummaryWriter()  # NVFlare's tracking writer: events stream to the server's tb_events/<site>
    training_writer = training_statistics_writer(settings, to_server)

    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:
            break
        round_num = input_model.current_round
        model.load_state_dict(input_model.params)
        metrics = validate(model, val_loader, device, settings, use_amp)
        global_model = frozen_copy(model) if fedprox is not None else None  # FedProx pulls towards it

        started = time.perf_counter()
        meta = {}
        if plan is None:
            steps, train_loss = train_one_round(
                model,
                global_model,
                train_loader,
                optimizer,
                loss_fn,
                fedprox,
                settings.aggregation_epochs,
                device,
                scaler,
            )
        else:
            steps, train_loss = dpsgd.train_one_round(
                model, global_model, train_loader, optimizer, loss_fn, fedprox, settings.aggregation_epochs, device
            )
            meta[DPSGD_META] = dpsgd.dpsgd_round_record(plan, round_num)
        log_round(to_server, training_writer, round_num, metrics, train_loss, steps)
        privacy_note = f", epsilon {meta[DPSGD_META]['epsilon']:.4g} spent" if plan else ""
        dice = f"global model val_dice {metrics['val_dice']:.4f}, " if "val_dice" in metrics else ""
        print(
            f"[{site_name}] round {round_num}: {dice}{steps} local steps in {time.perf_counter() - started:.1f} s, "
            f"train loss {train_loss:.4f}{privacy_note}",
            flush=True,
        )

        flare.send(
            flare.FLModel(
                params={k: v.detach().cpu() for k, v in model.state_dict().items()},
                metrics=metrics,
                meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps, **meta},
            )
        )


if __name__ == "__main__":
    main()
