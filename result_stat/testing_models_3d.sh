#!/usr/bin/env bash
# Evaluate the best models of the paper's configurations in one table (the seed's entry point):
#   brats18_1 (centralised), brats18_4 (FedAvg), brats18_4_dp (FedAvg + SVT), brats18_4_dpsgd (FedAvg + DP-SGD).
# A thin wrapper: every flag goes to `python -m result_stat.evaluate` unchanged (see its --help), which by default
# evaluates those of the four jobs that were run under --workspace and skips the others with a message.
#
#   result_stat/testing_models_3d.sh --workspace /tmp/nvflare/simulation --output_dir /tmp/evaluation
#
# Relative paths are taken from the current folder; the interpreter is $PYTHON if set, else python3.
set -euo pipefail
repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHONPATH="$repo_dir${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m result_stat.evaluate "$@"
