"""Test only (tests/test_audit_e2e.py): a Python process started with this folder on PYTHONPATH runs DP-SGD without
noise, while the plan, and so the accountant's epsilon the site reports, stays the calibrated one. This is the bug
an audit must catch: the formal accounting cannot see it. Python imports sitecustomize at start-up, so the simulator
and every site process it starts inherit the patch."""

import dataclasses

from brats_fl.privacy import dpsgd

_calibrated_optimizer = dpsgd.make_dp_optimizer


def _noiseless_optimizer(optimizer, plan, noise_generator, secure_mode=False):
    noiseless = dataclasses.replace(plan, noise_multiplier=0.0)
    return _calibrated_optimizer(optimizer, noiseless, noise_generator, secure_mode)


dpsgd.make_dp_optimizer = _noiseless_optimizer
