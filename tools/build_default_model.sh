#!/usr/bin/env bash
# Rebuilds the default model that ships in scgpt_runtime/default_model (docs/default-model.md)
# with the CLI defaults, as a user would:
#   1. fine-tune the "small" preset from random weights on Kang's control cells (7 PBMC types);
#      no pretraining: at this scale it lowered the held-out score (docs/results.md, "CLI
#      defaults end to end": 0.439 +- 0.093 pretrained against 0.668 +- 0.051 from scratch)
#      while the validation score on control cells was the same (0.72-0.77);
#   2. export it on the defaults (a ladder of lengths from the run's cells, fp32 and fp16, int8
#      where it passes validation on the run's validation cells);
#   3. score the bundle, as scgpt-run serves it, on Kang's stimulated cells (never trained on)
#      and record the metrics in the bundle;
#   4. install the bundle into the package (with --install).
# Usage: tools/build_default_model.sh [--install] [WORK_DIR]   (default WORK_DIR: build/default-model)
# Needs the training extra: pip install torch==2.13.0 ".[train]". About 3 minutes on 2 CPU cores.
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
step scgpt-train finetune annotate --from-scratch --data "$kang" --where condition=control \
    --label-key cell_type --out "$work/pbmc" --seed 0 --json > "$work/finetune.json"

step scgpt-train export "$work/pbmc" --out "$work/bundle" --json > "$work/export.json"

for precision in fp32 fp16; do
    step scgpt-train evaluate --bundle "$work/bundle" --precision "$precision" --data "$kang" \
        --where condition=stimulated --label-key cell_type --record \
        --json > "$work/evaluate-$precision.json"
done
scgpt-run info "$work/bundle"
sha256sum "$work"/bundle/*.onnx "$work"/bundle/*.safetensors

if [ "$install" = yes ]; then
    rm -rf scgpt_runtime/default_model
    cp -r "$work/bundle" scgpt_runtime/default_model
    echo "installed: scgpt_runtime/default_model ($(du -sh scgpt_runtime/default_model | cut -f1))"
fi
