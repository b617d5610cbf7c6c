#!/usr/bin/env bash
# Rebuilds the default model that ships in scgpt_runtime/default_model (docs/default-model.md):
#   1. pretrain the "small" preset on real unlabelled human cells of ../shared/data, with a
#      PBMC-sized vocabulary (the 6,998 genes of the Kang PBMC file);
#   2. fine-tune a cell-type head on Kang's control cells (7 PBMC types);
#   3. export fp32 (CPU) and fp16 (GPU) graphs of 128 tokens (validated against PyTorch);
#   4. score the bundle, as scgpt-run serves it, on Kang's stimulated cells (never trained on)
#      and record the metrics in the bundle;
#   5. install the bundle into the package (with --install).
# Usage: tools/build_default_model.sh [--install] [WORK_DIR]   (default WORK_DIR: build/default-model)
# Needs the training extra: pip install torch==2.13.0 ".[train]". About 20 minutes on 2 CPU cores.
# Reproducible: fixed seeds, 2 compute threads whatever the machine, relative paths, and
# SOURCE_DATE_EPOCH (default: the last commit's time) for the dates in the records.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

install=no
if [ "${1:-}" = "--install" ]; then install=yes; shift; fi
work=${1:-build/default-model}
data=${SCGPT_DATA:-../shared/data}
[ -d "$data/unlabelled" ] || { echo "error: no data at $data (set SCGPT_DATA)" >&2; exit 3; }
rm -rf "$work" && mkdir -p "$work"

export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2  # fixed: float sums depend on the thread count
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
kang=$data/labelled/kang2018_pbmc_counts.h5ad
# 128 tokens: each cell's 127 most expressed genes; dropout off for fine-tuning (it learns in
# a dozen epochs instead of dozens). Chosen by the comparisons in docs/results.md.
echo '{"model": {"max_seq_len": 128}, "tokens": {"selection": "top", "seed": 0}}' \
    > "$work/pretrain.config.json"
echo '{"model": {"dropout": 0.0}}' > "$work/finetune.config.json"
step() { echo "+ $*" >&2; SECONDS=0; "$@"; echo "  ${SECONDS}s" >&2; }

# The quickstart sample (scvi_pbmc_10k_protein_v3_200) and the Kang file stay out of
# pretraining: the first is the README's example, the second holds the held-out cells.
step scgpt-train pretrain \
    --data "$data/unlabelled/liao2020_balf_GSM4339772_C144_filtered_feature_bc_matrix.h5" \
    --data "$data/unlabelled/liao2020_balf_GSM4339774_C146_filtered_feature_bc_matrix.h5" \
    --data "$data/unlabelled/liao2020_balf_GSM4475052_C149_filtered_feature_bc_matrix.h5" \
    --data "$data/unlabelled/harmony_kang2018_ctrl_stim_2000.h5ad" \
    --data "$data/unlabelled/scvi_pbmc_5k_protein_v3_200.h5ad" \
    --vocab "$kang" --config "$work/pretrain.config.json" --out "$work/pretrained" \
    --preset small --max-steps 6000 --batch-size 32 --lr 1e-3 --warmup-steps 100 \
    --mlm-weight 0.5 --val-fraction 0.02 --eval-every 1000 --checkpoint-every 2000 --seed 0 \
    --json > "$work/pretrain.json"

step scgpt-train finetune annotate --from "$work/pretrained" --data "$kang" \
    --config "$work/finetune.config.json" --where condition=control --label-key cell_type \
    --out "$work/pbmc" --epochs 12 --lr 1e-3 --batch-size 32 --class-weight balanced \
    --patience 5 --val-fraction 0.1 --seed 0 --json > "$work/finetune.json"

step scgpt-train export "$work/pbmc" --out "$work/bundle" --precision fp32 --precision fp16 \
    --max-len 128 --validation-data "$kang" --json > "$work/export.json"

for precision in fp32 fp16; do
    step scgpt-train evaluate --bundle "$work/bundle" --precision "$precision" --data "$kang" \
        --where condition=stimulated --label-key cell_type --record \
        --json > "$work/evaluate-$precision.json"
done
scgpt-run info "$work/bundle"
sha256sum "$work"/bundle/*.onnx "$work/bundle/vocab.safetensors"

if [ "$install" = yes ]; then
    rm -rf scgpt_runtime/default_model
    cp -r "$work/bundle" scgpt_runtime/default_model
    echo "installed: scgpt_runtime/default_model ($(du -sh scgpt_runtime/default_model | cut -f1))"
fi
