"""Differential privacy of a run: what each mechanism spends, and the report that adds it up.

- ``svt``: the paper's mechanism, NVFlare's ``SVTPrivacy`` filter on each site's outgoing weight difference
  (site-level, pure DP); its accounting is in :mod:`brats_fl.privacy.svt`.
- ``dpsgd``: per-case clipped, noised local training calibrated to a target (epsilon, delta) (patient-level);
  calibration and the private training step are in :mod:`brats_fl.privacy.dpsgd`.
- :mod:`brats_fl.privacy.report` adds up what every site spent, round by round, into ``privacy_report.json``;
  :mod:`brats_fl.privacy.report_filter` is the server filter that feeds it.
- ``python -m brats_fl.privacy svt|dpsgd`` predicts a configuration's figures before it runs.

This module holds only the names the others share; it imports neither torch nor NVFlare.
"""

from __future__ import annotations

MECHANISMS = ("svt", "dpsgd")
# Metadata keys on a site's update (a DXO's meta). The first two are NVFlare's own (set by SVTPrivacy).
SVT_BUDGET_META = "svt_privacy_budget"
SVT_ACCOUNTANT_META = "svt_privacy_accountant"
DPSGD_META = "dpsgd_privacy"


class PrivacyConfigError(ValueError):
    """Privacy settings that cannot give the promised guarantee; the message names the flag to change."""
