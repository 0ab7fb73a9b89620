#!/usr/bin/env bash
# The vllm tier on the GPU host, in one command of at most 600 s: unpack Ray Serve's wheels
# (../shared/tools/gpu-wheels.sh) and the vLLM site (tests/vllm/wheels.sh) with
# tests/vllm/unpack.sh, then run `pytest -m vllm tests/vllm` against a real `vllm serve`.
#
# From the repository root on the host, after earlier runs (one per part, the host kept
# warm) copied .gpu-wheels/part.* into /tmp/parts/ and .gpu-wheels-vllm/part.* into
# /tmp/parts-vllm/; parts carried with this run itself are taken from the tree too:
#   bash tests/vllm/gpu-run.sh [pytest arguments]
# Everything it prints is also in $OUT/vllm-tier.log, with the server's own log
# ($OUT/vllm-server.log) and a JUnit report ($OUT/vllm-tier.xml).
set -uo pipefail
out=${OUT:-/tmp/vllm-tier-out}
mkdir -p "$out"
exec > >(tee "$out/vllm-tier.log") 2>&1
budget=${VLLM_TIER_BUDGET_S:-585}
elapsed() { echo "[$SECONDS s] $*"; }

source tests/vllm/unpack.sh
ls -l /tmp/parts /tmp/parts-vllm 2>/dev/null
unpack_ray_site || exit 2
elapsed "Ray Serve's wheels in /tmp/site"
unpack_vllm_site || exit 2
elapsed "vLLM in /tmp/vllm-site"

nvidia-smi -L
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
PYTHONPATH=/tmp/vllm-site python3 -c 'import vllm, vllm._C_stable_libtorch, vllm.vllm_flash_attn._vllm_fa3_C; print("vllm", vllm.__version__, "kernels load")'

export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 \
  SERVE_APP_VLLM_SITE=/tmp/vllm-site SERVE_APP_REQUIRE_VLLM=1
left=$((budget - SECONDS)); [ "$left" -gt 60 ] || left=60
elapsed "pytest, at most $left s"
timeout -s INT "$left" python3 -m pytest -m vllm tests/vllm -q -rA -p no:cacheprovider \
  --basetemp=/tmp/vllm-tier-tmp --junitxml="$out/vllm-tier.xml" "$@"
status=$?
log=$(ls /tmp/vllm-tier-tmp/vllm-log*/vllm.log 2>/dev/null | head -1)
[ -n "$log" ] && tail -c 8000000 "$log" > "$out/vllm-server.log"
elapsed "pytest exited $status"
exit $status
