"""One federated site: MONAI training of BratsSegResNet on the NVFlare Client API.

Every round: receive the global model, validate it, train ``aggregation_epochs`` local epochs, and send the weights
back (the Client API turns them into a weight difference, as job.py asks) with the validation Dice and the number of
local steps, which FedAvg uses as the aggregation weight. One site validates for all (by default), scoring a snapshot
of the received model in a background thread while it trains, so its validation does not lengthen the round.
In an evaluation job (job.py's final evaluation, or --checkpoint) the site instead scores the received model case by
case on its validation cases and sends only those scores.

Its settings come from ``brats_settings.json``, which job.py ships next to this file (brats_fl/settings.py defines
them). The imaging pipeline (transforms, loss, Dice, sliding-window inference) is brats_fl/pipeline.py, shared with
the evaluation and the tests. With DP-SGD, local training is brats_fl/privacy/dpsgd.py and the update carries the
site's spent epsilon in its metadata; with SVT, NVFlare's filter perturbs the update after this script sends it.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import nvflare.client as flare
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.client.tracking import SummaryWriter

import brats_fl.pipeline as bp
from brats_fl import nvflare_compat
from brats_fl.cache import CaseCache
from brats_fl.evaluation import CASES_KEY, score_cases
from brats_fl.privacy import DPSGD_META, audit, dpsgd
from brats_fl.settings import SETTINGS_FILE, SITE_FAILURE_META, TrainingSettings
from brats_fl.site_data import read_site_data
from model import BratsSegResNet

LOCAL_EVENTS_DIR = "local_tb_events"  # with DP: the site's training statistics, kept in the site's job folder


def site_job_dir() -> Path:
    """This job's folder at the site (where NVFlare runs this file from: brats_fl/nvflare_compat.py)."""
    return nvflare_compat.site_job_dir(__file__)


def site_workspace() -> Path:
    """The site's own folder (its startup kit's): its local/ settings and its case cache outlive the job."""
    return site_job_dir().parent


# ---------------------------------------------------------------------------------------------------------------
# Setting up the site
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Site:
    """Everything one site trains and validates with, built once and kept for all rounds."""

    name: str
    settings: TrainingSettings
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None  # None at a site that does not validate
    loss_fn: torch.nn.Module
    scaler: torch.amp.GradScaler
    fedprox: torch.nn.Module | None
    dpsgd_plan: dpsgd.DPSGDPlan | None


def site_seed(settings: TrainingSettings, site_name: str) -> int:
    return settings.seed + sum(site_name.encode())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_dp_noise_secret() -> None:
    """Reseed NumPy's global generator from the OS after seed_everything: NVFlare's SVT filter runs in this process
    and draws its Laplace noise from that generator, which must not be reproducible from the public --seed.
    (MONAI's augmentation is seeded through torch, so training stays reproducible.)"""
    np.random.seed(None)


def set_cpu_threads(settings: TrainingSettings, site_name: str) -> None:
    """The site's share of the machine's cores; the site that validates for all gets every core: it is the round's
    critical path, and runs on alone once the other sites have sent their updates."""
    if settings.validate_at == "one_site" and site_name == settings.validating_site:
        torch.set_num_threads(os.cpu_count() or 1)
    elif settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)


def site_data(settings: TrainingSettings, site_name: str) -> tuple[str, Path]:
    """(dataset root, the site's datalist file): from the job in the simulator, from the site's own data setting in a
    POC or a real deployment (brats_fl/site_data.py), where the job carries no path."""
    if settings.dataset_base_dir is not None:
        name = "site-All" if settings.centralised else site_name
        return settings.dataset_base_dir, Path(settings.datalist_json_path) / f"{name}.json"
    data = read_site_data(site_name, site_workspace())
    return str(data.dataset_base_dir), data.datalist


def site_datalist(settings: TrainingSettings, site_name: str) -> dict:
    return bp.read_datalist(site_data(settings, site_name)[1])


def site_loader(settings: TrainingSettings, site_name: str, device: torch.device, part: str, steps, shuffle: bool):
    """A loader over one part ("training" or "validation") of the site's datalist; preprocessed cases come from the
    disk cache shared by every site and round on this machine when the settings name one. Each loader draws from its
    own generator, so whether this site validates changes nothing in its training."""
    base_dir, datalist_file = site_data(settings, site_name)
    datalist = bp.read_datalist(datalist_file)
    cache = CaseCache(site_workspace() / settings.cache_dir) if settings.cache_dir else None  # relative: site-local
    entries = bp.resolve_entries(datalist[part], base_dir)
    if part == "training":
        entries = audit.trained_entries(settings, site_name, entries)  # with --audit: the half it keeps
    dataset = bp.make_dataset(entries, steps, cache, settings.cache_dataset, bp.datalist_et_label(datalist))
    generator = torch.Generator().manual_seed(site_seed(settings, site_name))
    return bp.make_loader(
        dataset,
        shuffle=shuffle,
        generator=generator,
        num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
    )


def build_validation_loader(settings: TrainingSettings, site_name: str, device: torch.device):
    et_label = bp.datalist_et_label(site_datalist(settings, site_name))
    return site_loader(settings, site_name, device, "validation", bp.validation_steps(et_label), shuffle=False)


def build_loaders(settings: TrainingSettings, site_name: str, device: torch.device):
    """The site's training loader, and its validation loader if it validates (else None)."""
    et_label = bp.datalist_et_label(site_datalist(settings, site_name))
    train_loader = site_loader(
        settings, site_name, device, "training", bp.training_steps(settings.roi_size, et_label), shuffle=True
    )
    val_loader = build_validation_loader(settings, site_name, device) if settings.validates(site_name) else None
    return train_loader, val_loader


def set_up_site(settings: TrainingSettings, site_name: str) -> Site:
    set_cpu_threads(settings, site_name)
    seed_everything(site_seed(settings, site_name))
    if settings.dp_mechanism:
        keep_dp_noise_secret()
    device = bp.select_device()
    use_amp = settings.uses_amp(device.type)
    train_loader, val_loader = build_loaders(settings, site_name, device)
    model = BratsSegResNet(init_filters=settings.init_filters).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=1e-5)
    audit.insert_canaries(optimizer, model, settings, site_name, len(train_loader.dataset))  # with --audit
    plan = None
    if settings.dp_mechanism == "dpsgd":
        plan, train_loader, optimizer = set_up_dpsgd(settings, site_name, train_loader.dataset, optimizer, device)
    fedprox = None
    if settings.fedproxloss_mu > 0:
        from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

        fedprox = PTFedProxLoss(mu=settings.fedproxloss_mu)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    return Site(
        site_name, settings, device, model, optimizer, train_loader, val_loader, bp.make_loss(), scaler, fedprox, plan
    )


def set_up_dpsgd(settings: TrainingSettings, site_name: str, train_ds, optimizer, device):
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


# ---------------------------------------------------------------------------------------------------------------
# One round: validate the received model, train, report
# ---------------------------------------------------------------------------------------------------------------
def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A gradient-free snapshot of the received global model."""
    snapshot = copy.deepcopy(model).eval()
    for p in snapshot.parameters():
        p.requires_grad_(False)
    return snapshot


def validate(site: Site, global_model: torch.nn.Module) -> dict[str, float]:
    """Dice of the received global model on the site's validation cases; {} at a site that does not validate (an
    empty dict, not None: NVFlare's FedAvg then leaves the site out of the round's mean instead of dropping it)."""
    if site.val_loader is None:
        return {}
    metrics = bp.evaluate_dice(
        global_model, site.val_loader, site.device, site.settings.infer_roi_size, use_amp=site.scaler.is_enabled()
    )
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def start_validation(site: Site, global_model: torch.nn.Module, background: ThreadPoolExecutor) -> Future:
    """The site that validates for all does it in a background thread while it trains (its validation would
    otherwise lengthen every round); with --validate_every_site each site validates first, then trains, exactly as
    the paper's workflow does."""
    if site.settings.validate_at == "one_site":
        return background.submit(validate, site, global_model)
    done: Future = Future()
    done.set_result(validate(site, global_model))
    return done


def train_one_round(site: Site, global_model: torch.nn.Module) -> tuple[int, float]:
    """Local training; returns (number of optimiser steps, mean loss)."""
    if site.dpsgd_plan is not None:
        return dpsgd.train_one_round(
            site.model,
            global_model,
            site.train_loader,
            site.optimizer,
            site.loss_fn,
            site.fedprox,
            site.settings.aggregation_epochs,
            site.device,
        )
    site.model.train()
    steps, loss_sum = 0, 0.0
    for _ in range(site.settings.aggregation_epochs):
        for batch in site.train_loader:
            image, label = batch["image"].to(site.device), batch["label"].to(site.device)
            site.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=site.device.type, enabled=site.scaler.is_enabled()):
                loss = site.loss_fn(site.model(image), label)
                if site.fedprox is not None:
                    loss = loss + site.fedprox(site.model, global_model)  # pulls towards the received model
            site.scaler.scale(loss).backward()
            site.scaler.step(site.optimizer)
            site.scaler.update()
            steps += 1
            loss_sum += float(loss.detach())
    return steps, loss_sum / max(steps, 1)


def training_statistics_writer(settings: TrainingSettings, to_server: SummaryWriter):
    """Where train_loss and train_steps go. They are computed from the site's training cases and no privacy mechanism
    protects them, so with DP they stay in the site's own job folder (local_tb_events/, next to the app); without
    DP they go to the server's TensorBoard like the validation Dice."""
    if not settings.dp_mechanism:
        return to_server
    from torch.utils.tensorboard import SummaryWriter as LocalSummaryWriter

    return LocalSummaryWriter(log_dir=str(site_job_dir() / LOCAL_EVENTS_DIR))


def log_round(to_server, training_writer, round_num: int, metrics: dict[str, float], train_loss: float, steps: int):
    """TensorBoard scalars, one point per round (global step = FL round): the validation Dice of the received global
    model to the server, the training statistics to training_writer."""
    for key, value in metrics.items():
        to_server.add_scalar(key, value, global_step=round_num)
    training_writer.add_scalar("train_loss", train_loss, global_step=round_num)
    training_writer.add_scalar("train_steps", steps, global_step=round_num)


def final_evaluation(settings: TrainingSettings, site_name: str, params: dict) -> dict:
    """The received model's per-case scores on the site's validation cases (brats_fl/evaluation.py, the code
    result_stat uses): {"cases": {case id: scores}}, or {} at a site that does not validate. Only these scores leave
    the site."""
    if not settings.validates(site_name):
        return {}
    device = bp.select_device()
    model = BratsSegResNet(init_filters=settings.init_filters).to(device)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})  # the evaluation job sends NumPy
    loader = build_validation_loader(settings, site_name, device)
    use_amp = settings.uses_amp(device.type)
    started = time.perf_counter()
    cases = score_cases(model, loader, device, settings.infer_roi_size, use_amp=use_amp)
    print(f"[{site_name}] final evaluation: {len(cases)} cases in {time.perf_counter() - started:.1f} s", flush=True)
    return {CASES_KEY: cases}


def train_and_report(site: Site, input_model, to_server, training_writer, background: ThreadPoolExecutor) -> None:
    """One round: validate the received model (in the background at the one validating site), train, send."""
    round_num = input_model.current_round
    site.model.load_state_dict(input_model.params)
    global_model = frozen_copy(site.model)  # what is validated, and what FedProx pulls towards
    validation = start_validation(site, global_model, background)

    started = time.perf_counter()
    steps, train_loss = train_one_round(site, global_model)
    meta = {FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps}
    if site.dpsgd_plan is not None:
        meta[DPSGD_META] = dpsgd.dpsgd_round_record(site.dpsgd_plan, round_num)
    metrics = validation.result()

    log_round(to_server, training_writer, round_num, metrics, train_loss, steps)
    dice = f"global model val_dice {metrics['val_dice']:.4f}, " if "val_dice" in metrics else ""
    privacy = f", epsilon {meta[DPSGD_META]['epsilon']:.4g} spent" if DPSGD_META in meta else ""
    print(
        f"[{site.name}] round {round_num}: {dice}{steps} local steps in {time.perf_counter() - started:.1f} s, "
        f"train loss {train_loss:.4f}{privacy}",
        flush=True,
    )
    params = {k: v.detach().cpu() for k, v in site.model.state_dict().items()}
    flare.send(flare.FLModel(params=params, metrics=metrics, meta=meta))


def report_failure(site_name: str, error: BaseException) -> None:
    """Send the exception that stops this site as the task's result, so that the server ends the job with it
    (brats_fl/fl_components.py: SiteFailureWatcher) and the submitter sees it, even in a deployment where the site's
    logs stay at the site. (Raising instead makes NVFlare report the task as aborted, without the reason.) The
    innermost cause is what says why (MONAI wraps a transform's error)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = (str(error).strip().splitlines() or [""])[0][:500]
    try:
        flare.send(flare.FLModel(metrics={}, meta={SITE_FAILURE_META: f"{site_name}: {type(error).__name__}: {text}"}))
    except Exception:  # the connection may be what failed; the site's own log still has the error
        pass


def main() -> None:
    settings = TrainingSettings.read(Path(__file__).with_name(SETTINGS_FILE))
    flare.init()
    site_name = flare.get_site_name()
    site, to_server, training_writer = None, None, None  # set up at the first training task
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="validation")

    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:
            break
        try:
            if flare.is_evaluate():  # the evaluation job (job.py's final evaluation, or --checkpoint)
                flare.send(flare.FLModel(metrics=final_evaluation(settings, site_name, input_model.params)))
                continue
            if site is None:
                site = set_up_site(settings, site_name)
                to_server = SummaryWriter()  # NVFlare's tracking writer: events stream to the server's tb_events/
                training_writer = training_statistics_writer(settings, to_server)
            train_and_report(site, input_model, to_server, training_writer, background)
        except Exception as e:
            traceback.print_exc()  # into the site's own log
            report_failure(site_name, e)  # and to the server, which ends the job with it
            return


if __name__ == "__main__":
    main()
