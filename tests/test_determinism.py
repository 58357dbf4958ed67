"""Same seed, same result (docs/determinism.md): the server's sum over the sites does not depend on which site answers
first, and a site's local training does not depend on its concurrent validation thread."""

from __future__ import annotations

import itertools
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.fedavg import FedAvg

from brats_fl.nvflare_compat import BratsFedAvg, SiteOrderedFedAvg

SITES = ("site-1", "site-2", "site-3", "site-4")


def site_updates() -> dict[str, FLModel]:
    """Weight differences of very different magnitudes (where the order of a float32 sum shows), site-1's Dice only
    (the one validating site), unequal step counts (FedAvg's weights)."""
    g = torch.Generator().manual_seed(0)
    updates = {}
    for i, site in enumerate(SITES):
        params = {"w": torch.randn(64, 32, generator=g) * 10.0 ** (3 * i - 4), "b": torch.randn(7, generator=g)}
        metrics = {"val_dice": 0.5, "val_dice_tc": 0.25} if site == "site-1" else {}
        meta = {FLMetaKey.NUM_STEPS_CURRENT_ROUND: 8 + i, "client_name": site}
        updates[site] = FLModel(params=params, params_type=ParamsType.DIFF, metrics=metrics, meta=meta)
    return updates


def start_round(controller: FedAvg) -> None:
    """The state FedAvg.run() resets at the start of each round (NVFlare 2.9)."""
    controller.current_round = 3
    controller._aggr_helper = WeightedAggregationHelper(exclude_vars=controller.exclude_vars)
    controller._aggr_metrics_helper = WeightedAggregationHelper()
    controller._all_metrics = True
    controller._received_count, controller._expected_count = 0, len(SITES)
    controller._params_type, controller._site_metric_weights = None, {}


def aggregate(controller: FedAvg, order) -> FLModel:
    """One round of the controller's aggregation, the sites' results arriving in `order`."""
    updates = site_updates()
    start_round(controller)
    for site in order:
        assert controller._aggregate_one_result(updates[site]) is True
    return controller._get_aggregated_result()


def test_nvflare_fedavg_alone_depends_on_the_arrival_order():
    """What the fix is for: with NVFlare 2.9's in-time aggregation, some arrival orders give another global model.
    (Should this fail with a later NVFlare, it sums in a fixed order itself and SiteOrderedFedAvg in
    brats_fl/nvflare_compat.py may go.)"""
    results = {order: aggregate(FedAvg(num_clients=4), order).params for order in itertools.permutations(SITES)}
    first = results[SITES]
    assert any(not torch.equal(first["w"], r["w"]) for r in results.values())


@pytest.mark.parametrize("controller_class", [SiteOrderedFedAvg, BratsFedAvg])
def test_the_global_model_is_bit_identical_whatever_the_arrival_order(controller_class):
    reference = aggregate(controller_class(num_clients=4), SITES)
    for order in itertools.permutations(SITES):
        result = aggregate(controller_class(num_clients=4), order)
        assert all(torch.equal(result.params[k], reference.params[k]) for k in reference.params), order


def test_the_round_result_is_nvflares_in_site_order():
    """Same parameters, metrics, weights and metadata as NVFlare's FedAvg receiving the sites in name order: what
    round_metrics.jsonl is written from does not change."""
    ours = aggregate(SiteOrderedFedAvg(num_clients=4), ("site-3", "site-1", "site-4", "site-2"))
    nvflare = aggregate(FedAvg(num_clients=4), SITES)
    assert all(torch.equal(ours.params[k], nvflare.params[k]) for k in nvflare.params)
    assert ours.params_type == nvflare.params_type == ParamsType.DIFF
    assert ours.metrics == nvflare.metrics == {"val_dice": 0.5, "val_dice_tc": 0.25}
    assert ours.current_round == nvflare.current_round == 3
    assert ours.meta == nvflare.meta
    assert ours.meta["nr_aggregated"] == 4 and AppConstants.METRICS_AGGREGATION_INFO in ours.meta


def test_a_result_without_parameters_is_skipped_as_nvflare_skips_it():
    updates = site_updates()
    updates["site-2"] = FLModel(params={}, metrics={}, meta={"client_name": "site-2"})
    results = {}
    for controller in (SiteOrderedFedAvg(num_clients=2), FedAvg(num_clients=2)):
        start_round(controller)
        accepted = [controller._aggregate_one_result(updates[site]) for site in ("site-2", "site-1")]
        results[type(controller)] = (accepted, controller._get_aggregated_result())
    (ours_accepted, ours), (nvflare_accepted, nvflare) = results[SiteOrderedFedAvg], results[FedAvg]
    assert ours_accepted == nvflare_accepted == [False, True]  # the empty result is reported not accepted
    assert ours.meta == nvflare.meta and ours.meta["nr_aggregated"] == 1
    assert all(torch.equal(ours.params[k], nvflare.params[k]) for k in nvflare.params)


def test_local_training_does_not_depend_on_the_concurrent_validation(tiny_federation):
    """The validating site scores the received model in a background thread while it trains: its update is the same,
    bit for bit, as when it trains alone, and the same again on a second run with the same seed."""
    import client
    from brats_fl.settings import demo_settings
    from model import BratsSegResNet

    data_dir, datalist_dir = tiny_federation
    settings = demo_settings(
        dataset_base_dir=str(data_dir),
        datalist_json_path=str(datalist_dir),
        roi_size=(16, 16, 16),
        infer_roi_size=(32, 32, 24),
        validating_site="site-1",
    )
    initial = BratsSegResNet(init_filters=settings.init_filters, init_seed=0).state_dict()
    threads, rng_states = torch.get_num_threads(), (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def local_update(validate_concurrently: bool) -> dict:
        site = client.set_up_site(settings, "site-1")
        torch.set_num_threads(2)  # the same on every machine this test runs on
        site.model.load_state_dict(initial)
        received = client.frozen_copy(site.model)
        with ThreadPoolExecutor(max_workers=1) as background:
            validation = client.start_validation(site, received, background) if validate_concurrently else None
            client.train_one_round(site, received)
            if validation is not None:
                assert "val_dice" in validation.result()
        return {k: v.clone() for k, v in site.model.state_dict().items()}

    try:
        alone, concurrent, again = local_update(False), local_update(True), local_update(True)
    finally:  # set_up_site seeds the global generators and sets the thread count: give the other tests theirs back
        torch.set_num_threads(threads)
        random.setstate(rng_states[0]), np.random.set_state(rng_states[1]), torch.set_rng_state(rng_states[2])
    assert any(not torch.equal(alone[k], initial[k]) for k in initial)  # it did train
    assert all(torch.equal(alone[k], concurrent[k]) and torch.equal(concurrent[k], again[k]) for k in alone)
