#!/usr/bin/env bash
# Rebuilds the default model that ships in scgpt_runtime/default_model (docs/default-model.md)
# with the CLI defaults, as a user would, twice:
#   1. the held-out build: fine-tune the "small" preset from random weights on Kang's control
#      cells only (7 PBMC types), export it, score it on the stimulated cells it never saw;
#   2. the shipped build: the same command on every labelled Kang cell (control and
#      stimulated), exported; the held-out build's figures are recorded into it (its
#      evaluation.json names the build they were measured on), and its own figures on all Kang
#      cells, which it trained on, are recorded for tools/check_default_model.py to reproduce;
#   3. install the shipped bundle into the package (with --install).
# No pretraining: at this scale it lowered the held-out score (docs/results.md, "CLI defaults
# end to end": 0.439 +- 0.093 pretrained against 0.668 +- 0.051 from scratch) while the
# validation score on control cells was the same (0.72-0.77). Export on its defaults: a ladder
# of lengths from the run's cells, fp32 and fp16, int8 where it passes validation.
# Usage: tools/build_default_model.sh [--install] [WORK_DIR]   (default WORK_DIR: build/default-model)
# Needs the training extra: pip install torch==2.13.0 ".[train]". About 4 minutes on 2 CPU cores.
# Reproducible: fixed seed, 2 compute threads whatever the machine, relative paths, and
# SOURCE_DATE_EPOCH (default: the last commit's time) for the dates in the records.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

install=no
if [ "${1:-}" = "--install" ]; then install=yes; shift; fi
work=${1:-build/default-model}
data=${SCGPT_DATA:-../shared/data}
[ -d "$data/labelled" ] || { echo "error: no data at $data (set SCGPT_DATA)" >&2; exit 3; }
rm -rf "$work" && mkdir -p "$work"

export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2  # fixed: float sums depend on the thread count
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
kang=$data/labelled/kang2018_pbmc_counts.h5ad
step() { echo "+ $*" >&2; SECONDS=0; "$@"; echo "  ${SECONDS}s" >&2; }

# Only the required arguments and a seed: the defaults are the recipe.
build() {  # NAME [--where FILTER]: fine-tune and export into $work/NAME-run, $work/NAME
    local name=$1; shift
    step scgpt-train finetune annotate --from-scratch --data "$kang" "$@" \
        --label-key cell_type --out "$work/$name-run" --seed 0 --json > "$work/finetune-$name.json"
    step scgpt-train export "$work/$name-run" --out "$work/$name" --json > "$work/export-$name.json"
}
build heldout --where condition=control
build bundle

# every precision each export kept (int8 passes validation in one build and not another)
precisions() { python -c "import sys; from scgpt_runtime.bundle import load_bundle as b
print(*b(sys.argv[1]).precisions)" "$1"; }
for precision in $(precisions "$work/heldout"); do
    step scgpt-train evaluate --bundle "$work/heldout" --precision "$precision" --data "$kang" \
        --where condition=stimulated --label-key cell_type --record-into "$work/bundle" \
        --json > "$work/evaluate-heldout-$precision.json"
done
for precision in $(precisions "$work/bundle"); do
    step scgpt-train evaluate --bundle "$work/bundle" --precision "$precision" --data "$kang" \
        --label-key cell_type --record --json > "$work/evaluate-trained-$precision.json"
done
scgpt-run info "$work/bundle"
sha256sum "$work"/heldout/*.onnx "$work"/bundle/*.onnx "$work"/bundle/*.safetensors

if [ "$install" = yes ]; then
    rm -rf scgpt_runtime/default_model
    cp -r "$work/bundle" scgpt_runtime/default_model
    echo "installed: scgpt_runtime/default_model ($(du -sh scgpt_runtime/default_model | cut -f1))"
fi
