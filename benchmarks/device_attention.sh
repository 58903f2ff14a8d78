#!/usr/bin/env bash
# One device run for issue 3 (attention JVP): the attention tests compiled on CUDA, then the
# benchmark at the GPU shapes. Logs go to $OUT (the device tool brings them back).
#   run from the repository root:  OUT=/tmp/out bash benchmarks/device_attention.sh
set -u -o pipefail
OUT=${OUT:-/tmp/attention_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  $PY -c "import xformers; print('xformers', xformers.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.txt"

# tests: fixed tile sizes except the tests that ask for autotuning (keeps compile time short)
SCMCTL_ATTN_AUTOTUNE=0 timeout 200 $PY -m pytest tests/test_attention.py -q -rs -p no:cacheprovider \
  --durations=8 2>&1 | tee "$OUT/tests.log"
echo "tests exit: $?" | tee -a "$OUT/tests.log"

timeout 220 $PY benchmarks/attention_jvp.py --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
echo "bench exit: $?" | tee -a "$OUT/bench.log"
