#!/usr/bin/env bash
# Evaluate the best models of the paper's three configurations in one table:
#   brats18_1 (centralised), brats18_4 (FedAvg, 4 sites), brats18_4_dp (FedAvg + SVT differential privacy),
#   brats18_4_dpsgd (FedAvg + patient-level DP-SGD).
# Jobs that were not run (no best_FL_global_model.pt) are skipped with a message.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: result_stat/testing_models_3d.sh [-w WORKSPACE] [-d DATASET_BASE_DIR] [-l DATALIST] [-o OUTPUT_DIR] [-- EXTRA...]

Evaluates <WORKSPACE>/{brats18_1,brats18_4,brats18_4_dp,brats18_4_dpsgd}/server/simulate_job/app_server/best_FL_global_model.pt
on the validation cases with python -m result_stat.evaluate and prints the results table.

  -w, --workspace DIR         simulator workspace root (env BRATS_WORKSPACE; default /tmp/nvflare/simulation)
  -d, --dataset_base_dir DIR  folder the datalist paths are relative to (env BRATS_DATASET_BASE_DIR;
                              default: what each job's clients used)
  -l, --datalist PATH         datalist JSON, or folder of site-N.json (env BRATS_DATALIST;
                              default: what each job's clients used)
  -o, --output_dir DIR        where per_case.csv and summary.md go (env BRATS_EVAL_OUTPUT_DIR;
                              default <WORKSPACE>/evaluation)
  -h, --help                  this help
  -- EXTRA...                 passed on to result_stat.evaluate, e.g. -- --save_predictions --device cpu

The Python interpreter is $PYTHON if set, else python3. Exit code 2 when no job was run or a flag is bad.
EOF
}

workspace="${BRATS_WORKSPACE:-/tmp/nvflare/simulation}"
dataset="${BRATS_DATASET_BASE_DIR:-}"
datalist="${BRATS_DATALIST:-}"
output_dir="${BRATS_EVAL_OUTPUT_DIR:-}"
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -w|--workspace|-d|--dataset_base_dir|-l|--datalist|-o|--output_dir)
            if [[ $# -lt 2 ]]; then echo "error: $1 needs a value (see --help)" >&2; exit 2; fi
            case "$1" in
                -w|--workspace) workspace="$2" ;;
                -d|--dataset_base_dir) dataset="$2" ;;
                -l|--datalist) datalist="$2" ;;
                -o|--output_dir) output_dir="$2" ;;
            esac
            shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [[ ! -d "$workspace" ]]; then
    echo "error: workspace $workspace does not exist; pass -w/--workspace or set BRATS_WORKSPACE" >&2
    exit 2
fi

jobs=()
for job in brats18_1 brats18_4 brats18_4_dp brats18_4_dpsgd; do
    model="$workspace/$job/server/simulate_job/app_server/best_FL_global_model.pt"
    if [[ -f "$model" ]]; then
        jobs+=("$job")
    else
        echo "skipping $job: not run (no $model)"
    fi
done
if [[ ${#jobs[@]} -eq 0 ]]; then
    echo "error: none of brats18_1, brats18_4, brats18_4_dp, brats18_4_dpsgd has a best model under $workspace; run job.py first" >&2
    exit 2
fi

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
args=(--workspace "$workspace" --jobs "${jobs[@]}")
[[ -n "$dataset" ]] && args+=(--dataset_base_dir "$dataset")
[[ -n "$datalist" ]] && args+=(--datalist "$datalist")
[[ -n "$output_dir" ]] && args+=(--output_dir "$output_dir")
cd "$repo_dir"
exec "${PYTHON:-python3}" -m result_stat.evaluate "${args[@]}" "${extra[@]}"
