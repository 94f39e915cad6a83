#!/usr/bin/env bash
# The fashion-mnist preset end to end: build the data if missing, train, print accuracy and time.
#
#   scripts/fashion_mnist.sh                      # 2 ranks, in the current directory
#   RANKS=4 scripts/fashion_mnist.sh --epochs 30  # extra options go to `distbp train`
#
# Uses `distbp` and `mpiexec` from PATH (override with DISTBP=..., MPIEXEC=...). Data goes to
# ./data (built from Debian's dataset-fashion-mnist, see `distbp data fashion-mnist --help`);
# every run gets a fresh run directory under ./runs. Last line:
#   fashion-mnist: test accuracy 0.XXXX, wall time N s, R ranks, run dir runs/...
set -euo pipefail

DISTBP=${DISTBP:-distbp}
MPIEXEC=${MPIEXEC:-mpiexec}
RANKS=${RANKS:-2}
run_dir="runs/fashion-mnist-$(date +%Y%m%d-%H%M%S)"

if [[ ! -f data/fashion-mnist-train.h5 || ! -f data/fashion-mnist-test.h5 ]]; then
  "$DISTBP" data fashion-mnist --out data
fi

start=$(date +%s)
"$MPIEXEC" -n "$RANKS" "$DISTBP" train --preset fashion-mnist --run-dir "$run_dir" "$@"
wall=$(( $(date +%s) - start ))

accuracy=$(python3 - "$run_dir/metrics.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
print(f"{[r for r in records if r.get('kind') == 'val'][-1]['accuracy']:.4f}")
PY
)
echo "fashion-mnist: test accuracy $accuracy, wall time $wall s, $RANKS ranks, run dir $run_dir"
