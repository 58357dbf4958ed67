"""The privacy audit's canaries and hold-out: what every site and the auditor derive from the audit's secret seed.

``job.py --audit`` measures what an honest-but-curious server can infer from the updates it receives, inside the
training job itself (docs/privacy.md, "The privacy audit"). This module is the part both sides share:

- **Canaries.** Each site draws ``audit_canaries`` canary ids. Canary ``j`` of site ``s`` is a dense random sign
  vector over the model's parameters (every value +-1/sqrt(d), d the number of parameters, so its norm is 1),
  regenerated from (seed, s, j) wherever it is needed: nothing of size d is ever stored per canary. It is *included*
  with probability 1/2, independently, decided by the seed.
- **Insertion** (:class:`CanaryInserter`): every local step, each included canary is drawn with the patients'
  sampling probability 1/n (n = training cases at the site) and its direction, scaled to ``dp_max_grad_norm`` (C),
  is added to the step's gradient just before the optimiser uses it. Under DP-SGD that is after Opacus clipped the
  patients' gradients, summed them, added the noise and divided by the expected batch size 1: since the noise is
  independent of the canary, this is the same as one more record of norm C summed before the noise, so DP-SGD's
  guarantee covers a canary exactly as it covers a patient. Without DP and under SVT the same vector is added to the
  step's gradient (SVT then perturbs the whole update, canaries included, as it leaves the site).
- **Hold-out.** Half of each site's training cases (``n // 2``, chosen by the seed) are left out of training, so the
  auditor can test real patients' membership: trained against held out.

The draws that say *when* an included canary enters a step use a generator seeded from the operating system, as
the patients' Poisson sampling does: the auditor knows which canaries exist and (to grade its guesses) which were
included, never when they were used.

torch is imported inside the functions that need it: job.py checks flags and counts cases without loading it.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from brats_fl.settings import TrainingSettings

_CANARY_STREAM = 1  # the seed's sub-streams: canary directions, inclusion, hold-out
_INCLUSION_STREAM = 2
_HOLD_OUT_STREAM = 3
OBSERVATIONS_FILE = "privacy_audit_observations.json"  # the auditor's record, in the server's job folder
MIN_CANARIES = 16
DEFAULT_CANARIES = 256  # per site: 128 included on average; the demo's four sites give 1,024 canaries in all


class AuditConfigError(ValueError):
    """Audit settings no run can use; the message names the flag."""


# ---------------------------------------------------------------------------------------------------------------
# Everything the seed decides
# ---------------------------------------------------------------------------------------------------------------
def new_audit_seed() -> int:
    """A fresh secret seed (63 bits from the operating system): never --seed, and nothing the server logs."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def site_key(site: str) -> int:
    """A stable integer for a site name (CRC-32), to mix into the seed."""
    return zlib.crc32(site.encode())


def _generator(seed: int, stream: int, site: str, *more: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, site_key(site), *more])))


def canary_bits(seed: int, site: str, canary_id: int, d: int) -> np.ndarray:
    """Canary canary_id of site as d bits (uint8 0/1): value +1/sqrt(d) where 1, -1/sqrt(d) where 0."""
    raw = _generator(seed, _CANARY_STREAM, site, canary_id).bytes((d + 7) // 8)
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=d)


def canary_direction(seed: int, site: str, canary_id: int, d: int) -> np.ndarray:
    """Canary canary_id of site as a float32 unit vector of d values, each +-1/sqrt(d)."""
    bits = canary_bits(seed, site, canary_id, d).astype(np.float32)
    return (2 * bits - 1) / np.float32(math.sqrt(d))


def included_canaries(seed: int, site: str, n_canaries: int) -> np.ndarray:
    """Which of the site's canaries are inserted: each independently with probability 1/2 (what the one-run bound
    assumes)."""
    return _generator(seed, _INCLUSION_STREAM, site).random(n_canaries) < 0.5


def held_out_cases(seed: int, site: str, n_cases: int) -> np.ndarray:
    """Which of the site's n_cases training cases (in datalist order) the audit leaves out of training: n // 2 of
    them, a uniformly random half."""
    held_out = np.zeros(n_cases, bool)
    held_out[_generator(seed, _HOLD_OUT_STREAM, site).permutation(n_cases)[: n_cases // 2]] = True
    return held_out


def trained_entries(settings: TrainingSettings, site: str, entries: Sequence[Any]) -> list:
    """The training entries the site trains on: all of them, or with --audit the half the audit keeps."""
    if not settings.audit:
        return list(entries)
    held_out = held_out_cases(settings.audit_seed, site, len(entries))
    return [e for e, out in zip(entries, held_out) if not out]


def trained_case_count(settings: TrainingSettings, n_cases: int) -> int:
    """How many of a site's n_cases training cases it trains on (what DP-SGD's plan is calibrated for)."""
    return n_cases - n_cases // 2 if settings.audit else n_cases


# ---------------------------------------------------------------------------------------------------------------
# The parameter vector canaries live in
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParameterLayout:
    """The model's parameters as one flat vector: tensors in sorted-name order, each flattened. The site (its
    named parameters) and the server (the update's keys) both use this order, so a canary means the same there."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]

    @classmethod
    def of_arrays(cls, arrays: Mapping[str, Any]) -> ParameterLayout:
        names = tuple(sorted(arrays))
        return cls(names, tuple(int(np.size(arrays[n])) for n in names))

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def flatten(self, arrays: Mapping[str, Any]) -> np.ndarray:
        """One float32 vector of the arrays (NumPy or torch), in this layout's order."""
        parts = []
        for name in self.names:
            value = arrays[name]
            if hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            parts.append(np.asarray(value, dtype=np.float32).reshape(-1))
        return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------------------------
# The site: canaries entering local training
# ---------------------------------------------------------------------------------------------------------------
class CanaryInserter:
    def __init__(
        self,
        seed: int,
        site: str,
        n_canaries: int,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        norm: float,
        sampling_rate: float,
    ):
        """Adds the site's included canaries to the gradients before each optimiser step (see the module's text).

        Args:
            seed, site, n_canaries: which canaries exist and which are included.
            named_parameters: the model's parameters, by name (their sorted order is the canary's layout).
            norm: the L2 norm of one canary's gradient (C, --dp_max_grad_norm).
            sampling_rate: the probability an included canary enters a step (1/n, the patients').
        """
        params = dict(named_parameters)
        self.names = tuple(sorted(params))
        self.params = [params[n] for n in self.names]
        self.d = sum(p.numel() for p in self.params)
        self.seed, self.site = seed, site
        self.included_ids = np.flatnonzero(included_canaries(seed, site, n_canaries))
        self.norm = float(norm)
        self.sampling_rate = float(sampling_rate)
        self._secret = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))  # when, never from the seed
        self.inserted_total = 0

    def sampled_now(self) -> np.ndarray:
        """The included canaries that enter this step (each independently with the sampling rate)."""
        return self.included_ids[self._secret.random(self.included_ids.size) < self.sampling_rate]

    def gradient_of(self, canary_ids: Sequence[int]) -> np.ndarray:
        """norm x the sum of these canaries' unit directions, as one float32 vector."""
        ones = np.zeros(self.d, np.int16 if len(canary_ids) < 2**15 else np.int32)  # how many +1s per value
        for j in canary_ids:
            np.add(ones, canary_bits(self.seed, self.site, int(j), self.d), out=ones, casting="unsafe")
        scale = np.float32(self.norm / math.sqrt(self.d))
        return (2 * ones - len(canary_ids)).astype(np.float32) * scale

    def add_to_gradients(self) -> int:
        """Add this step's canaries to every parameter's .grad; returns how many entered."""
        import torch

        ids = self.sampled_now()
        if ids.size == 0:
            return 0
        vector = torch.from_numpy(self.gradient_of(ids))
        offset = 0
        for p in self.params:
            part = vector[offset : offset + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype)
            offset += p.numel()
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.add_(part)
        self.inserted_total += int(ids.size)
        return int(ids.size)

    def __call__(self, optimizer, args, kwargs) -> None:
        """torch's optimizer step pre-hook signature."""
        self.add_to_gradients()


def insert_canaries(optimizer, model, settings: TrainingSettings, site: str, n_train: int) -> CanaryInserter | None:
    """With --audit (and unless --audit_no_insert): register the site's canaries on its optimiser (the Adam that
    DP-SGD wraps), so each of its steps first adds the canaries drawn for it. Returns the inserter, or None."""
    if not settings.audit or settings.audit_no_insert:
        return None
    inserter = CanaryInserter(
        settings.audit_seed,
        site,
        settings.audit_canaries,
        model.named_parameters(),
        settings.dp_max_grad_norm,
        1.0 / n_train,
    )
    optimizer.register_step_pre_hook(inserter)
    return inserter


# ---------------------------------------------------------------------------------------------------------------
# job.py: the audit's flags, checked before anything runs
# ---------------------------------------------------------------------------------------------------------------
AUDIT_ONLY_FLAGS = ("audit_canaries", "audit_no_insert")
NOT_RESUMABLE = "an audited job cannot be resumed (its audit would miss rounds); run it again"


def audit_flag_problem(audit: bool, given: Mapping[str, Any], env: str, checkpoint: bool) -> str | None:
    """One line naming the flag and what to do, or None."""
    if not audit:
        for flag in AUDIT_ONLY_FLAGS:
            if flag in given:
                return f"--{flag} is a setting of the privacy audit: add --audit (or leave --{flag} out)"
        return None
    if checkpoint:
        return "--audit with --checkpoint: the audit observes training, and --checkpoint trains nothing"
    if env != "sim":
        return (
            f"--audit with --env {env}: the audit runs in the simulator only (--env sim): its auditor at the server "
            "reads every site's training cases, which a deployment's server does not have"
        )
    return None


def secret_seed_setting(audit: bool) -> dict[str, int]:
    """The audit_seed setting job.py ships to the sites and the auditor: a new secret one per audited job."""
    return {"audit_seed": new_audit_seed()} if audit else {}


def hold_out_problem(site: str, n_cases: int) -> str | None:
    """Why a site cannot be audited (it needs a case to train on and one to hold out), or None."""
    if n_cases < 2:
        return (
            f"--audit: {site} has {n_cases} training case(s); the audit holds out half of each site's cases and "
            "needs at least 2 per site"
        )
    return None
