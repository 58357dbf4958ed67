"""Predict what a privacy configuration spends, before running it.

    python -m brats_fl.privacy svt --dp_fraction 0.9 --dp_epsilon 0.001 --dp_noise_var 1.0 --dp_gamma 1e-4
    python -m brats_fl.privacy dpsgd --n_train 60 --dp_target_epsilon 8

The flags are job.py's, with job.py's defaults: ``svt`` prints the per-site budget of NVFlare's SVT filter for the
SegResNet of --init_filters, ``dpsgd`` the noise multiplier a site of --n_train training cases gets and the epsilon
it has spent after each round.
"""

from __future__ import annotations

import argparse
import sys

from brats_fl.privacy import PrivacyConfigError
from brats_fl.settings import EXIT_BAD_INPUT, SettingsError, TrainingSettings, default, describe_default

DEFAULT_N_TRAIN = 60  # the paper's sites hold 60-61 training cases


def count_update_values(init_filters: int) -> int:
    """Numbers in the update a site sends (the model's state_dict; SegResNet has no buffers)."""
    from model import BratsSegResNet  # the repository's model.py, next to job.py

    return sum(v.numel() for v in BratsSegResNet(init_filters=init_filters).state_dict().values())


def print_table(rows: dict) -> None:
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        text = f"{value:,}" if isinstance(value, int) else f"{value:.6g}"
        print(f"  {key:<{width}}  {text}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m brats_fl.privacy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    svt = sub.add_parser("svt", help="per-site budget of NVFlare's SVT filter for a model and settings")
    svt.add_argument(
        "--init_filters",
        type=int,
        default=default("init_filters"),
        help=f"SegResNet base width {describe_default('init_filters')}",
    )
    for flag, what in (
        ("dp_fraction", "fraction of the update's values released"),
        ("dp_epsilon", "budget of the threshold and query noise"),
        ("dp_noise_var", "release noise parameter"),
        ("dp_gamma", "clipping bound of each value"),
    ):
        svt.add_argument(f"--{flag}", type=float, default=default(flag), help=f"{what} {describe_default(flag)}")
    svt.add_argument(
        "--num_rounds",
        type=int,
        default=default("num_rounds"),
        help=f"FL rounds to sum over {describe_default('num_rounds')}",
    )
    dp = sub.add_parser("dpsgd", help="noise multiplier and epsilon per round of a DP-SGD plan")
    dp.add_argument(
        "--n_train", type=int, default=DEFAULT_N_TRAIN, help=f"training cases at the site (default: {DEFAULT_N_TRAIN})"
    )
    dp.add_argument(
        "--num_rounds", type=int, default=default("num_rounds"), help=f"FL rounds {describe_default('num_rounds')}"
    )
    dp.add_argument(
        "--aggregation_epochs",
        type=int,
        default=default("aggregation_epochs"),
        help=f"local epochs per round {describe_default('aggregation_epochs')}",
    )
    dp.add_argument(
        "--dp_target_epsilon",
        type=float,
        default=default("dp_target_epsilon"),
        help=f"epsilon after all rounds {describe_default('dp_target_epsilon')}",
    )
    dp.add_argument("--dp_delta", type=float, help="delta (default: 0.1 / n_train)")
    dp.add_argument(
        "--dp_max_grad_norm",
        type=float,
        default=default("dp_max_grad_norm"),
        help=f"per-case gradient clipping bound {describe_default('dp_max_grad_norm')}",
    )
    return p


def predict_svt(args: argparse.Namespace) -> int:
    from brats_fl.privacy.svt import SVTSettings, svt_figures

    TrainingSettings(
        dp_mechanism="svt",
        init_filters=args.init_filters,
        dp_fraction=args.dp_fraction,
        dp_epsilon=args.dp_epsilon,
        dp_noise_var=args.dp_noise_var,
        dp_gamma=args.dp_gamma,
    ).check()
    if args.num_rounds < 1:
        raise SettingsError(f"--num_rounds {args.num_rounds}: need >= 1")
    svt = SVTSettings(args.dp_fraction, args.dp_epsilon, args.dp_noise_var, args.dp_gamma)
    print(
        f"NVFlare SVTPrivacy, per site (SegResNet init_filters {args.init_filters}, fraction {svt.fraction}, "
        f"epsilon {svt.epsilon}, noise_var {svt.noise_var}, gamma {svt.gamma}):"
    )
    print_table(svt_figures(count_update_values(args.init_filters), svt, args.num_rounds))
    return 0


def predict_dpsgd(args: argparse.Namespace) -> int:
    from brats_fl.privacy.dpsgd import dpsgd_round_record, plan_dpsgd

    plan = plan_dpsgd(
        args.n_train,
        args.num_rounds,
        args.aggregation_epochs,
        args.dp_target_epsilon,
        args.dp_delta,
        args.dp_max_grad_norm,
    )
    print(
        f"DP-SGD plan: n_train {plan.n_train}, sampling rate {plan.sample_rate:.4g}, {plan.steps_per_round} "
        f"steps/round x {plan.num_rounds} rounds = {plan.total_steps} steps, delta {plan.delta:.3g}, "
        f"noise multiplier {plan.noise_multiplier:.4f} (noise sd {plan.noise_multiplier * plan.max_grad_norm:.4g} "
        f"on the summed clipped gradients)"
    )
    last = plan.num_rounds - 1
    for r in sorted({r for r in (0, 1, plan.num_rounds // 4, plan.num_rounds // 2, last) if 0 <= r <= last}):
        print(f"  after round {r:>4}: epsilon {dpsgd_round_record(plan, r)['epsilon']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return predict_svt(args) if args.command == "svt" else predict_dpsgd(args)
    except (SettingsError, PrivacyConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
