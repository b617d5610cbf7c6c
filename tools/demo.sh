#!/usr/bin/env bash
# The whole life cycle on real data in a few minutes on CPU (a GPU where there is one): pretrain
# a small model on unlabelled cells, fine-tune it as a cell-type classifier on Kang 2018 control
# cells, export it as an ONNX bundle, annotate with the torch-free runtime, and score it on the
# held-out interferon-stimulated cells. Each command is printed before it runs, then its results.
#
# Usage: tools/demo.sh [WORK_DIR]
#   WORK_DIR   new or empty folder for runs, bundle, outputs and logs [default: a new mktemp -d]
#   SCGPT_DATA data folder [default: ../shared/data beside this checkout]
# Needs scgpt-train and scgpt-run on PATH (pip install ".[train]", or the checkout's .venv).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${SCGPT_DATA:-$root/../shared/data}"

die() {
    echo "demo: $*" >&2
    exit 1
}

[[ -d "$data" ]] ||
    die "data folder $data not found: put the shared data beside this checkout or set SCGPT_DATA"
data="$(cd "$data" && pwd)"
kang="$data/labelled/kang2018_pbmc_counts.h5ad"
corpus=(  # the Kang file stays out: its stimulated cells are the test set
    "$data/unlabelled/liao2020_balf_GSM4339772_C144_filtered_feature_bc_matrix.h5"
    "$data/unlabelled/harmony_kang2018_ctrl_stim_2000.h5ad"
    "$data/unlabelled/scvi_pbmc_5k_protein_v3_200.h5ad"
)
for f in "${corpus[@]}"; do
    [[ -f "$f" ]] || die "data file $f not found in $data (see its README.md)"
done
for c in scgpt-train scgpt-run python3; do
    command -v "$c" >/dev/null ||
        die "$c not found: activate the environment (source $root/.venv/bin/activate)"
done

work="${1:-$(mktemp -d "${TMPDIR:-/tmp}/scgpt-demo.XXXXXX")}"
mkdir -p "$work"
[[ -z "$(ls -A "$work")" ]] || die "work folder $work is not empty: pass a new or empty one"
work="$(cd "$work" && pwd)"
cd "$work"
mkdir logs
echo "Work folder: $work (kept at the end; runs, bundle, outputs, and logs/ with each step's log)"
echo "Data folder: $data"

# scgpt-run takes every CPU unless told: follow OMP_NUM_THREADS where the caller set it.
threads=()
if [[ -n "${OMP_NUM_THREADS:-}" ]]; then
    threads=(--threads "$OMP_NUM_THREADS")
fi

t_start=$SECONDS
t_step=$SECONDS

step() {  # step N TITLE: a header; restarts the step clock
    printf '\n== %s ==\n' "$*"
    t_step=$SECONDS
}

run() {  # run NAME CMD...: print CMD, run it with stdout to NAME.json and stderr to logs/NAME.log
    local name=$1
    shift
    printf '$'
    printf ' %q' "$@"
    printf '\n'
    if ! "$@" >"$name.json" 2>"logs/$name.log"; then
        echo "demo: step $name failed; the end of logs/$name.log:" >&2
        tail -n 15 "logs/$name.log" >&2
        exit 1
    fi
}

took() {
    echo "  (step took $((SECONDS - t_step)) s)"
}

# ------------------------------------------------------------------------------------- pretrain
step "1/5 pretrain: generative pretraining on unlabelled cells"
echo '{"model": {"max_seq_len": 128}, "tokens": {"selection": "top", "seed": 0}}' \
    >pretrain_config.json
echo "pretrain_config.json: $(cat pretrain_config.json)"
data_args=()
for f in "${corpus[@]}"; do
    data_args+=(--data "$f")
done
run pretrain scgpt-train pretrain "${data_args[@]}" --out runs/pretrained --preset small \
    --vocab "$kang" --config pretrain_config.json --max-steps 400 --batch-size 32 --lr 1e-3 \
    --warmup-steps 40 --mlm-weight 0.5 --json
python3 - pretrain.json runs/pretrained/metrics.jsonl <<'PY'
import json
import sys

final = json.load(open(sys.argv[1]))
rows = [json.loads(line) for line in open(sys.argv[2]) if line.strip()]
first, last = rows[0], rows[-1]
print(f"  {last['step']} steps of 32 cells; training loss {first['loss']:.1f} at step "
      f"{first['step']} -> {last['loss']:.1f} at step {last['step']}")
print(f"  (the sum of the generative expression MSE {last['gen_mse']:.1f}, the cell-embedding "
      f"MSE (GEPC) {last['mvc_mse']:.1f} and 0.5 x the masked-value MSE {last['mlm_mse']:.1f}; "
      "values are bins 0-50)")
if "val_loss" in final:
    print(f"  validation loss at the end: {final['val_loss']:.1f}")
print(f"  speed: {final['cells_per_s']:.0f} cells/s")
vocab = json.load(open("runs/pretrained/vocab.json"))
print(f"  vocabulary: {len(vocab)} tokens (Kang's genes and the special tokens)")
PY
took

# -------------------------------------------------------------------------------------- finetune
step "2/5 fine-tune: cell-type classifier on Kang control cells"
echo '{"model": {"dropout": 0.0}}' >finetune_config.json
echo "finetune_config.json: $(cat finetune_config.json)  (no dropout: learns in fewer epochs)"
run finetune scgpt-train finetune annotate --from runs/pretrained --data "$kang" \
    --config finetune_config.json --where condition=control --label-key cell_type \
    --class-weight balanced --epochs 20 --patience 8 --batch-size 32 --lr 1e-3 \
    --out runs/annotate --json
python3 - finetune.json <<'PY'
import json
import sys

s = json.load(open(sys.argv[1]))
print(f"  {s['n_train']} training and {s['n_val']} validation cells, {len(s['classes'])} classes")
print(f"  {s['epochs_run']} epochs; best epoch {s['best_epoch']}: validation macro-F1 "
      f"{s['val_macro_f1']:.3f}, accuracy {s['val_accuracy']:.3f}")
print(f"  weights loaded from the pretrained run: {s['load_report']}")
PY
took

# ---------------------------------------------------------------------------------------- export
step "3/5 export: ONNX bundle (fp32 for CPUs, fp16 for GPUs), each graph checked against PyTorch"
run export scgpt-train export runs/annotate --out kang_bundle --precision fp32 \
    --precision fp16 --max-len 128 --json
python3 - export.json <<'PY'
import json
import sys

s = json.load(open(sys.argv[1]))
for v in s["variants"]:
    errors = ", ".join(f"{k} {x:.3g}" if isinstance(x, float) else f"{k} {x}"
                       for k, x in v["errors"].items())
    print(f"  {v['file']}: {v['precision']}, {v['max_seq_len']} tokens, "
          f"{v['bytes'] / 1e6:.2f} MB; against PyTorch: {errors}")
PY
printf '$ scgpt-run info kang_bundle\n'
scgpt-run info kang_bundle | sed 's/^/  /'
took

# -------------------------------------------------------------------------------------- annotate
step "4/5 annotate: every Kang cell with the torch-free runtime"
run annotate scgpt-run annotate "$kang" --model kang_bundle --out kang_annotated.h5ad \
    "${threads[@]}" --json
python3 - annotate.json <<'PY'
import json
import sys

s = json.load(open(sys.argv[1]))
print(f"  {s['n_cells']} cells in {s['seconds']:.1f} s ({s['cells_per_s']:.0f} cells/s through "
      f"the {s['precision']} model on {s['device']}) -> kang_annotated.h5ad")
print(f"  genes matched to the vocabulary: {s['gene_match']['n_matched']} of "
      f"{s['gene_match']['n_genes']}")
counts = sorted(s["label_counts"].items(), key=lambda kv: -kv[1])
print("  predicted labels: " + ", ".join(f"{k} {n}" for k, n in counts))
print("  (the control cells among them were seen in fine-tuning: step 5 scores only the others)")
PY
took

# -------------------------------------------------------------------------------------- evaluate
step "5/5 evaluate: the bundle, as scgpt-run serves it, on the held-out stimulated cells"
run evaluate scgpt-train evaluate --bundle kang_bundle --data "$kang" \
    --where condition=stimulated --label-key cell_type --record --json
python3 - evaluate.json <<'PY'
import json
import sys

r = json.load(open(sys.argv[1]))
m = r.get("classifier", r)
print(f"  {m['n_cells']} stimulated cells: accuracy {m['accuracy']:.3f}, macro-F1 "
      f"{m['macro_f1']:.3f} ({r['precision']} graphs; recorded in kang_bundle/config.json)")
print("  references (data README, same split): logistic regression accuracy 0.805, "
      "macro-F1 0.714; PCA + 10-NN 0.719, 0.588")
gap = m["macro_f1"] - 0.714
print(f"  macro-F1 {abs(gap):.3f} {'above' if gap >= 0 else 'below'} logistic regression "
      "(this model: about 0.5 M parameters, minutes of CPU training)")
print("  per-class F1: " + ", ".join(f"{k} {v:.2f}" for k, v in m["per_class_f1"].items()))
PY
took

printf '\nDone in %d s. Everything is in %s:\n' "$((SECONDS - t_start))" "$work"
for f in *; do
    echo "  $f"
done
