#!/usr/bin/env bash
# One GPU call of the device tool: fla on the path, our compiled kernels carried over from the
# last call, stages run in order while the call's time lasts, logs and the kernel cache in $OUT.
#
#   bash bench/device_call.sh 540 "python3 bench/bench_bwd.py --models deltanet" "python3 -m pytest -q tests/kernels/test_gpu.py"
#
# (run with carry [".whl", ".tcache"]). The first argument is the seconds the stages may take
# in all; each stage gets what is left (a stage cut off by it exits 124, and the rest are skipped).
# Every stage's output goes to $OUT/stages.log (a call returns at most 8 files), its last lines
# to stdout, and a table of exit codes and seconds is printed last. Fresh machines spend minutes compiling:
# bench/triton_cache.py packs the kernels compiled here into $OUT/tcache.tgz.<part>; put them
# back with `cat <files_at>/tcache.tgz.* > .tcache/tcache.tgz` before the next call.
set -u
budget=$1; shift
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$HOME/fla-site" .whl/*.whl 2>/dev/null
export PYTHONPATH="$HOME/fla-site:$PWD" PYTHONUNBUFFERED=1
python3 bench/triton_cache.py unpack .tcache/tcache.tgz
start=$SECONDS
summary=""
n=0
for stage in "$@"; do
    n=$((n + 1))
    left=$((budget - (SECONDS - start)))
    if [ "$left" -le 10 ]; then
        summary+="stage $n: skipped (no time left): $stage"$'\n'
        continue
    fi
    t0=$SECONDS
    timeout "$left" bash -c "$stage" > /tmp/stage.log 2>&1
    rc=$?
    summary+="stage $n: rc $rc, $((SECONDS - t0)) s: $stage"$'\n'
    { echo "== stage $n (rc $rc): $stage"; cat /tmp/stage.log; } >> "$OUT/stages.log"
    echo "== stage $n (rc $rc): $stage"
    tail -15 /tmp/stage.log | cut -c1-300
done
python3 bench/triton_cache.py pack /tmp/tcache.tgz && split -b 15M -d /tmp/tcache.tgz "$OUT/tcache.tgz."
echo
printf "%s" "$summary"
