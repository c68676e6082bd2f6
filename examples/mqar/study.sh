#!/usr/bin/env bash
# The full MQAR study on one GPU: every (model, learning rate) in its own process side by side
# (these models are far too small to fill a GPU alone), each trained for MINUTES, then merged.
#
#   bash examples/mqar/study.sh MINUTES OUT [LRS] [MODELS] [BATCH]
#
# Writes OUT/mqar.{md,json,png} (the merged study) and OUT/runs/ (each run's log and JSON, written
# as the runs go, so a study cut off still leaves its logs).
set -u
minutes=$1 out=$2
lrs=${3:-1e-3,3e-3}
models=${4:-linear_attention,mamba2,gated_deltanet,bayesian_layer}
batch=${5:-}
work=$out/runs
mkdir -p "$work"
# one CPU thread per run: the data is drawn on the GPU, and many runs share the host's cores
export OMP_NUM_THREADS=1
for m in ${models//,/ }; do
    for lr in ${lrs//,/ }; do
        python3 -m examples.mqar.run --models "$m" --lrs "$lr" --minutes "$minutes" ${batch:+--batch "$batch"} --out "$work/$m-$lr" \
            > "$work/$m-$lr.log" 2>&1 &
    done
done
wait
parts=$(ls "$work"/*/mqar.json 2>/dev/null | paste -sd, -)
if [ -z "$parts" ]; then
    echo "no run finished; logs in $work" >&2
    tail -5 "$work"/*.log >&2
    exit 1
fi
python3 -m examples.mqar.run --merge "$parts" --out "$out"
