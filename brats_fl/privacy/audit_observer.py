"""The auditor at the server: what the privacy audit observes of every update the server receives.

:class:`AuditObserver` is a server input filter on "train" results, so it sees exactly what reaches the server from
a site: after the site's own output filters (NVFlare's SVT filter included) and before FedAvg uses it. It changes
nothing. For each update (one site, one round) it records in ``privacy_audit_observations.json`` (server job
folder):

- the cosine between the update and each of the site's canaries (regenerated from the audit's seed: the auditor
  knows the canaries, not when, or whether, the site used them). The update is the weight difference the site sent
  (local minus global weights; under SVT the filter's output: clipped, selected, noised values, scaled back by the
  local step count), flattened in the canaries' layout; the cosine is scale-free.
- for the membership test on real patients: the change in training loss that the update causes on each of the
  site's training cases, trained and held out alike: loss under the global model the site received minus loss under
  that model plus the update. The global model comes from the task the server sent (NVFlare's BEFORE_TRAIN_TASK
  event). In the simulator the server machine holds every site's data; the auditor is assumed to know the candidate
  records.
- a SHA-256 and the norm of the vector it scored, so a test can prove which vector that was.

brats_fl/privacy/audit_report.py turns these observations into the audit's figures after the run.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import threading
import time
from pathlib import Path
from threading import Lock

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from brats_fl.privacy.audit import OBSERVATIONS_FILE, ParameterLayout, canary_bits

PROBE_BATCH = 8  # cases per forward pass of the membership probe


def canary_cosines(seed: int, site: str, n_canaries: int, update: np.ndarray) -> np.ndarray:
    """cos(canary j, update) for j = 0..n_canaries-1. A canary is +-1/sqrt(d) per value, so its dot product with u is
    (2 sum(u where bit 1) - sum(u)) / sqrt(d); its norm is 1."""
    d = update.size
    norm = float(np.linalg.norm(update.astype(np.float64)))
    if norm == 0:
        return np.zeros(n_canaries)
    total = float(update.sum(dtype=np.float64))
    out = np.empty(n_canaries)
    for j in range(n_canaries):
        signs = canary_bits(seed, site, j, d).astype(np.float32)
        out[j] = (2 * float(signs @ update) - total) / math.sqrt(d) / norm
    return out


def vector_fingerprint(vector: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vector, dtype=np.float32).tobytes()).hexdigest()


def as_arrays(weights: dict) -> dict[str, np.ndarray]:
    """NumPy copies of a dict of tensors or arrays."""
    return {
        k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)).astype(np.float32, copy=True)
        for k, v in weights.items()
    }


def probe_crop(roi_size) -> list[int]:
    """The membership probe's crop: half the training crop per axis, in multiples of 8 (SegResNet's), at least 8.
    The probe runs the model twice per case and update, as much as the sites' training again at the full crop;
    halving each side costs 8 times less."""
    return [max(8, (r // 2) // 8 * 8) for r in roi_size]


class MembershipProbe:
    """Loss of a model on every candidate case of every site: the site's training cases, trained and held out,
    each as a deterministic crop centred on its tumour (:func:`probe_crop`; the training loss, no augmentation)."""

    def __init__(self, settings, n_clients: int):
        self.settings = settings
        self.n_clients = n_clients
        self._cases: dict[str, tuple] = {}  # site -> (images, labels), loaded on first use
        self._model = None
        self._device = None

    def candidates(self, site: str):
        if site not in self._cases:
            self._cases[site] = self._load(site)
        return self._cases[site]

    def _load(self, site: str):
        import torch
        from monai.transforms import Compose, CropForegroundd, ResizeWithPadOrCropd

        import brats_fl.pipeline as bp
        from brats_fl.cache import CaseCache

        s = self.settings
        name = "site-All" if s.centralised else site
        datalist = bp.read_datalist(Path(s.datalist_json_path) / f"{name}.json")
        et_label = bp.datalist_et_label(datalist)
        entries = bp.resolve_entries(datalist["training"], s.dataset_base_dir)
        roi, keys = probe_crop(s.roi_size), ["image", "label"]
        steps = Compose(
            [
                *bp.validation_steps(et_label).transforms,
                CropForegroundd(keys, source_key="label", margin=[r // 2 for r in roi], allow_smaller=True),
                ResizeWithPadOrCropd(keys, spatial_size=roi),
            ]
        )
        cache = CaseCache(s.cache_dir) if s.cache_dir and Path(s.cache_dir).is_absolute() else None
        dataset = bp.make_dataset(entries, steps, cache, 0.0, et_label)
        items = [dataset[i] for i in range(len(dataset))]
        images = torch.stack([torch.as_tensor(item["image"]) for item in items])
        labels = torch.stack([torch.as_tensor(item["label"]) for item in items])
        return images, labels

    def losses(self, site: str, weights: dict[str, np.ndarray]) -> np.ndarray:
        """The training loss (soft Dice) of the model with these weights on each of the site's candidate cases."""
        import torch

        import brats_fl.pipeline as bp
        from model import BratsSegResNet

        if self._model is None:
            self._device = bp.select_device()
            self._model = BratsSegResNet(init_filters=self.settings.init_filters).to(self._device).eval()
        self._model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
        images, labels = self.candidates(site)
        loss_fn = bp.make_loss()
        out = []
        with torch.no_grad():
            for start in range(0, len(images), PROBE_BATCH):  # a batch per forward pass; GroupNorm keeps cases apart
                predictions = self._model(images[start : start + PROBE_BATCH].to(self._device))
                for prediction, label in zip(predictions, labels[start : start + PROBE_BATCH]):
                    out.append(float(loss_fn(prediction[None], label[None].to(self._device))))
        return np.asarray(out)


class AuditObserver(DXOFilter):
    def __init__(self, settings: dict, n_clients: int, file_name: str = OBSERVATIONS_FILE):
        """Server input filter for "train" results (see the module's text); changes nothing.

        The filter only copies the update it sees and hands it to a worker thread: scoring takes seconds (the
        membership test runs the model), and a site whose result the server does not acknowledge within seconds
        times out and sends it again. The worker drains its queue before the run ends (END_RUN).

        Args:
            settings: the job's TrainingSettings as a dict (the audit's seed and canary count; the data and model
                the membership test needs).
            n_clients: number of sites.
            file_name: the observations file, in the server's job folder.
        """
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF], data_kinds_to_filter=None)
        from brats_fl.settings import TrainingSettings

        self.settings = settings  # as given: NVFlare writes a component's arguments into the job's configuration
        self.n_clients = n_clients
        self.file_name = file_name
        self._settings = TrainingSettings.from_dict(settings)
        self._lock = Lock()
        self._observations: dict = {}
        self._global: tuple[int, dict] | None = None  # (round, global weights sent in that round's task)
        self._probe = MembershipProbe(self._settings, n_clients)
        self._path: Path | None = None
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            self._path = Path(run_dir) / self.file_name
            self._observations = {"n_canaries": self._settings.audit_canaries, "sites": {}}
            self._worker = threading.Thread(target=self._score_queued, args=(fl_ctx,), name="audit", daemon=True)
            self._worker.start()
        elif event_type == AppEventType.BEFORE_TRAIN_TASK:
            self._keep_global_model(fl_ctx.get_prop(AppConstants.TRAIN_SHAREABLE))
        elif event_type == EventType.END_RUN and self._worker is not None:
            self.log_info(fl_ctx, f"audit: scoring the last {self._queue.qsize()} update(s) before the run ends")
            self._queue.put(None)
            self._worker.join()
            self._worker = None

    def _keep_global_model(self, task_data: Shareable | None) -> None:
        """The global model of the round's task (the same for every site; kept once per round)."""
        if task_data is None:
            return
        round_num = task_data.get_header(AppConstants.CURRENT_ROUND)
        with self._lock:
            if self._global is not None and self._global[0] == round_num:
                return
            self._global = (round_num, as_arrays(from_shareable(task_data).data))

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else "unknown-site"
        round_num = int(
            shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND, shareable.get_header(AppConstants.CURRENT_ROUND, -1))
        )
        update = as_arrays(dxo.data or {})  # a copy: FedAvg may use the arrays while the worker scores them
        if update:
            with self._lock:
                sent = self._global[1] if self._global is not None and self._global[0] == round_num else None
            self._queue.put((site, round_num, update, dxo.data_kind, sent))
        return None  # the update passes unchanged

    def _score_queued(self, fl_ctx: FLContext) -> None:
        while (item := self._queue.get()) is not None:
            site, round_num = item[:2]
            started = time.perf_counter()
            try:
                record = self.observe(*item)
            except Exception as e:  # the audit must never stop the training it observes; the report names the gap
                self.log_error(fl_ctx, f"audit: could not score {site}'s update of round {round_num}: {e!r}")
                continue
            with self._lock:
                self._observations["sites"].setdefault(site, {})[str(round_num)] = record
                if self._path is not None:
                    tmp = self._path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(self._observations))
                    tmp.replace(self._path)
            self.log_info(fl_ctx, f"audit: scored {site}'s round {round_num} in {time.perf_counter() - started:.1f} s")

    def observe(self, site: str, round_num: int, update: dict, data_kind: str, sent: dict | None) -> dict:
        """The record of one update: its fingerprint, its cosine with each canary, and (given the global model it
        answers) the loss change it causes on each of the site's candidate patients."""
        started = time.perf_counter()
        vector = ParameterLayout.of_arrays(update).flatten(update)
        record = {
            "data_kind": data_kind,
            "d": int(vector.size),
            "update_norm": float(np.linalg.norm(vector.astype(np.float64))),
            "update_sha256": vector_fingerprint(vector),
            "cosines": canary_cosines(self._settings.audit_seed, site, self._settings.audit_canaries, vector).tolist(),
        }
        record["canary_seconds"] = time.perf_counter() - started
        if sent is not None and data_kind == DataKind.WEIGHT_DIFF:
            started = time.perf_counter()
            after = {k: sent[k] + update[k] if k in update else sent[k] for k in sent}
            record["loss_change"] = (self._probe.losses(site, sent) - self._probe.losses(site, after)).tolist()
            record["patient_seconds"] = time.perf_counter() - started
        return record


def add_audit_observer(recipe, settings, n_clients: int) -> None:
    """The audit's server side, as a server input filter on every train result (after the sites' output filters)."""
    from dataclasses import asdict

    recipe.add_server_input_filter(AuditObserver(asdict(settings), n_clients), tasks=["train"])
