#!/usr/bin/env bash
# Step time, allreduce and FLOPs utilisation on 1, 2 and 4 ranks, measured back to back so
# the ratios compare like with like on a shared machine. Arguments go to `distbp bench`.
#
#   scripts/bench.sh --layers 784,1024,1024,10 --batch-size 512
set -euo pipefail
bin=$(dirname "$(command -v distbp)")
mpiexec=${MPIEXEC:-$bin/mpiexec}
for n in 1 2 4; do
  echo "== $n rank(s)"
  "$mpiexec" -n "$n" "$bin/distbp" bench "$@"
done
