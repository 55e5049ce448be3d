#!/usr/bin/env bash
# The GPU work of issues 5 and 8, in steps that each fit one 10-minute call of the lent GPU
# machine (30 minutes of device time per session in all). Prepare here first:
#
#   bash scripts/gpu_wheels.sh            # .whl/: packages the GPU image lacks (carry: .whl)
#
# then, on the GPU machine (device `run` with carry [".whl"]), one step per call:
#
#   bash benchmarks/gpu_session.sh tests        # whole suite incl. gpu-marked tests   (~5 min)
#   bash benchmarks/gpu_session.sh kernels      # attention backends + CUDA graphs     (~5 min)
#   bash benchmarks/gpu_session.sh mechanisms   # SM scaling, co-running, offload K=1,2,4 (~8 min)
#   bash benchmarks/gpu_session.sh profile      # nova profile of qwen2.5-vl-7b (bf16)  (~8 min)
#   bash benchmarks/gpu_session.sh serve        # nova serve x 5 policies + nova bench  (2 calls:
#                                               #  resumable, saved per point)
#
# Each step writes under benchmarks/results/<gpu-slug>/ (and the profile under
# nova/cost/profiles/) and packs what it wrote into $OUT/<step>.tgz, which comes back to the
# calling machine: unpack it in the repo root and commit.
#
# The demo model is not used here: its GGUF (94 MB) is over the per-call transfer limit, so the
# tests marked slow (which build it) are deselected on the GPU; they run on the CPU in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
STEP=${1:?step: tests | kernels | mechanisms | profile | serve}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .whl ] && [ ! -f /tmp/site/.nova-wheels ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  touch /tmp/site/.nova-wheels
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/nova-out}
mkdir -p "$OUT"
SLUG=$("$PY" -c "import torch; from nova.runtime.attention import gpu_slug; print(gpu_slug(torch.cuda.get_device_name()))")
RES=benchmarks/results/$SLUG
mkdir -p "$RES"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RES/nvidia-smi-$STEP.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
MODEL=${MODEL:-qwen2.5-vl-7b}
GPU_SPEC=$("$PY" -c "from nova.engine.core import _device_gpu_spec; print(_device_gpu_spec('cuda'))")
PROFILE=nova/cost/profiles/$MODEL-$GPU_SPEC.json

case "$STEP" in
  tests)
    set +e
    "$PY" -m pytest -q -m "not slow" -p no:cacheprovider 2>&1 | tee "$RES/pytest-gpu.txt"
    set -e
    ;;
  kernels)
    "$PY" -m pytest -q -p no:cacheprovider tests/test_attention_backends.py tests/test_cuda_graphs.py \
      2>&1 | tee "$RES/pytest-kernels.txt" || true
    "$PY" benchmarks/attention_decode.py
    ;;
  mechanisms)
    "$PY" benchmarks/gpu_mechanisms.py --model "$MODEL"
    ;;
  profile)
    # bfloat16 is nova profile's default on CUDA
    "$PY" -m nova.cli profile --model "$MODEL" --load-format dummy --device cuda \
      --partition auto --shares 0.25,0.5,0.75,1.0 --out "$PROFILE"
    ;;
  serve)
    "$PY" benchmarks/serve_eval.py --model "$MODEL" --load-format dummy --dtype bfloat16 \
      --device cuda --profile "$PROFILE" --rates 1 2 3 4 6 --sessions 16 --num-prompts 120 \
      --out "$RES/serve_eval"
    ;;
  *) echo "unknown step $STEP" >&2; exit 2 ;;
esac
tar czf "$OUT/$STEP.tgz" "$RES" $( [ -f "$PROFILE" ] && echo "$PROFILE" )
echo "packed $OUT/$STEP.tgz"
