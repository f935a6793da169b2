#!/usr/bin/env bash
# One device pass over the persistent decode kernel (benchmarks/NOTES.md, items 40-45), every step under
# a timeout (a kernel that waits on a tag nobody writes would hang): the fused-decode GPU tests, then
# same-process A/B runs and the phase trace, with and without the waits on other blocks. Results under
# $OUT (default ./layers-pass). ORDERS=1 adds the A/Bs of in_proj's row order and the barrier's arrival
# (items 43-44), SMALL=1 the persistent kernel against the four kernels per layer for the models ssm_out
# serves otherwise (130m, 370m; item 82), with ssm_out off.
#   bash benchmarks/layers_pass.sh
set -u
cd "$(dirname "$0")/.."
out=${OUT:-layers-pass}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the trace runs from benchmarks/
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export MAMBA_RT_CACHE_DIR=${MAMBA_RT_CACHE_DIR:-/tmp/mamba-rt-cache}
timeout 240 python -m pytest -v -p no:cacheprovider -m gpu -rs -x tests/runtime/test_fused_decode.py > "$out/tests.log" 2>&1
echo "tests exit $? (124: timed out)"; grep -c PASSED "$out/tests.log"; grep -v PASSED "$out/tests.log" | tail -20
grep -q " passed" "$out/tests.log" && ! grep -q " failed" "$out/tests.log" || exit 1
ab() { timeout 360 python benchmarks/profile_decode.py --batches 1 --ab-rounds 6 "$@" 2>&1 | grep '"ab"' | tee -a "$out/ab.jsonl"; }
ab --configs 790m,1.4b,2.8b --ab LAYERS_KERNEL=0/1  # (130m and 370m run ssm_out either way: SMALL)
ab --configs 1.4b,2.8b --ab LY_COMBINE_MIN_DMODEL=100000/0
if [ -n "${ORDERS:-}" ]; then ab --configs 1.4b,2.8b --ab LY_XFIRST=0/1; ab --configs 1.4b,2.8b --ab LY_ARRIVE_LAG=0/1; fi
if [ -n "${SMALL:-}" ]; then ab --configs 130m,370m --knob SSM_OUT=0 --ab LY_MIN_DMODEL=100000/0; fi
cd benchmarks
timeout 120 python trace_layers.py --configs 2.8b,1.4b --out "$out/trace.json" 2>&1 | tail -32
timeout 120 python trace_layers.py --configs 2.8b,1.4b --define MRT_LY_NOSYNC=1 --out "$out/trace-nosync.json" 2>&1 | tail -32
