#!/usr/bin/env bash
# The GPU check in one run (under 10 minutes on one H100/H200): the CUDA tests, then the GPU
# benchmark, each stage under its own time limit so that one failing stage leaves the others'
# results. Needs torch with CUDA and Triton; runs from the repository root without installing
# fastrnn (PYTHONPATH), so it works on a machine with no package registry.
#
#   OUT=DIR bash bench/gpu_check.sh [TEST_SECONDS=210] [BENCH_SECONDS=150] [GRID=quick] [DTYPES=float32,bfloat16] [PERSISTENT_SECONDS=120]
#
# TOTAL_S (env, default 570): the whole run's limit (the device tool allows 600 s a command); the
# profile and tile stages get what is left of it, and are skipped with under 30 s left.
#
# Writes to DIR (default bench/results/gpu-check): env.txt (date, GPU, versions), tests.log,
# junit.xml, bench.log and bench.tgz (fastrnn-bench's results.json/results.md/plots on GRID:
# quick, or gpu10 with the cell-loop baseline), persistent.log and persistent.tgz (lstm on the
# "persistent" grid: triton's persistent kernels vs its step kernels, launched and replayed from a
# CUDA graph, vs cuDNN vs a cell loop),
# profile.log/.json (bench/gpu_profile.py) and tiles.log (bench/gpu_tiles.py): 10 files, what a
# lent machine sends back.
set -u
OUT=${OUT:-bench/results/gpu-check}
TEST_S=${1:-210}
BENCH_S=${2:-150}
GRID=${3:-quick}
DTYPES=${4:-float32,bfloat16}
PERSIST_S=${5:-120}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
TOTAL_S=${TOTAL_S:-570}
stage() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
left() { local l=$(( TOTAL_S - ($(date +%s) - t0) )); echo $(( l < $1 ? l : $1 )); }

stage env
{
  date -u
  git log -1 --format='commit %H %cd' 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  grep -m1 'model name' /proc/cpuinfo; nproc
  $PY - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("triton", "numpy", "numba", "onnxruntime"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "unavailable:", type(e).__name__, e)
p = torch.cuda.get_device_properties(0)
print("device", p.name, "sm_%d%d" % (p.major, p.minor), "SMs", p.multi_processor_count,
      "memory GiB %.1f" % (p.total_memory / 2**30))
EOF
} 2>&1 | tee "$OUT/env.txt"

stage "CUDA tests (limit ${TEST_S} s)"
# -k: the triton cases of the parity-style files and every test of the triton files; SIGINT at
# the limit makes pytest print its summary of what ran.
workers=$(( $(nproc) > 12 ? 12 : $(nproc) ))
xdist=""; $PY -c "import xdist" 2>/dev/null && xdist="-n $workers"
per_test=""; $PY -c "import pytest_timeout" 2>/dev/null && per_test="--timeout 120"
timeout -s INT -k 30 "$TEST_S" $PY -m pytest -q -rfE -p no:cacheprovider -p no:warnings $xdist $per_test \
  --durations 15 --junitxml "$OUT/junit.xml" -k "triton or cuda" \
  tests/test_triton_launch.py tests/test_kernels_triton.py tests/test_triton_persistent.py tests/test_parity.py \
  tests/test_activations.py tests/test_peephole.py tests/test_modules.py \
  tests/test_double_backward.py 2>&1 | tee "$OUT/tests.log"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"

stage "GPU benchmark (cases started within ${BENCH_S} s)"
timeout -s INT -k 30 $(( BENCH_S + 60 )) $PY bench/gpu_bench.py --grid "$GRID" \
  --cells lstm,gru,rnn --backends triton --baselines "torch$([ "$GRID" = quick ] || echo ,cell-loop)" --budget 0.05 --dtypes "$DTYPES" \
  --max-minutes "$(awk "BEGIN{print $BENCH_S/60}")" --no-progress --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
[ -d "$OUT/bench" ] && tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
stage "persistent vs step vs cuDNN, lstm (cases started within ${PERSIST_S} s)"
timeout -s INT -k 30 $(( PERSIST_S + 60 )) $PY bench/gpu_bench.py --grid persistent \
  --cells lstm --backends triton-persistent,triton-streamed,triton-step,triton-step+graph --baselines torch,cell-loop --budget 0.05 \
  --dtypes "$DTYPES" --max-minutes "$(awk "BEGIN{print $PERSIST_S/60}")" --no-progress \
  --out "$OUT/persistent" 2>&1 | tee "$OUT/persistent.log"
echo "persistent bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/persistent.log"
[ -d "$OUT/persistent" ] && tar czf "$OUT/persistent.tgz" -C "$OUT" persistent && rm -rf "$OUT/persistent"
stage "where the time goes (bench/gpu_profile.py)"
if [ "$(left 180)" -ge 30 ]; then
  timeout -s INT -k 10 "$(left 180)" $PY bench/gpu_profile.py --out "$OUT/profile.json" 2>&1 | tee "$OUT/profile.log"
else echo "skipped: under 30 s of TOTAL_S=$TOTAL_S left" | tee "$OUT/profile.log"; fi
stage "step tiles (bench/gpu_tiles.py)"
if [ "$(left 150)" -ge 30 ]; then
  timeout -s INT -k 10 "$(left 150)" $PY bench/gpu_tiles.py 2>&1 | tee "$OUT/tiles.log"
else echo "skipped: under 30 s of TOTAL_S=$TOTAL_S left" | tee "$OUT/tiles.log"; fi
stage done
