#!/usr/bin/env bash
# The GPU host's whole run, one step per device command (each is limited to 10 minutes):
#   bash benchmarks/gpu_host.sh tests        # the GPU tier and the transform cost
#   bash benchmarks/gpu_host.sh end-to-end   # end_to_end.py at 128 and 2048 tokens
#   bash benchmarks/gpu_host.sh long         # end_to_end.py at 8192 tokens
#   bash benchmarks/gpu_host.sh vllm [ARGS]  # vllm_upstream.py [ARGS]: the gateway before a
#                                            # real vLLM
# Before the first, the wheels of `../shared/tools/gpu-wheels.sh` are copied to /tmp/parts/
# (one device command per part); the first step installs them into /tmp/site, which the
# host keeps while it is held (tests/vllm/unpack.sh). Before `vllm`, the parts of
# tests/vllm/wheels.sh are in /tmp/parts-vllm/ the same way, or /tmp/vllm-site is already
# unpacked (tests/vllm/gpu-run.sh). Results go to $OUT (the device tool's folder), else
# ./gpu-out.
set -uo pipefail
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
source tests/vllm/unpack.sh
unpack_ray_site || exit 2
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
export SERVE_APP_CACHE_DIR=/tmp/serve-app-cache
# The benchmark's layout: gateway and baseline on 8 cores each in turn, sink on 4, load on 4.
e2e=(--preset many-core --modes haproxy --concurrency 1 16 128 --seconds 4
     --replicas Gateway=3,Dispatcher=2,Embedder=2 --profile 6)
case "${1:-}" in
    tests)
        { nvidia-smi -L; python3 -c 'import torch; print(torch.__version__)'; nproc; } \
            > "$out/machine.txt" 2>&1
        timeout 300 python3 -m pytest tests/gpu -q -p no:cacheprovider -rs \
            > "$out/gpu_tests.txt" 2>&1
        echo "tests/gpu exit $?" >> "$out/gpu_tests.txt"
        timeout 200 python3 benchmarks/transform_cost.py --device cuda --out "$out" \
            > "$out/transform_cost.log" 2>&1
        echo "transform_cost exit $?" >> "$out/transform_cost.log"
        ;;
    end-to-end)
        python3 benchmarks/end_to_end.py "${e2e[@]}" --tokens 128 2048 --out "$out" \
            > "$out/end_to_end.log" 2>&1
        echo "end_to_end exit $?" >> "$out/end_to_end.log"
        ;;
    long)
        python3 benchmarks/end_to_end.py "${e2e[@]}" --tokens 8192 --out "$out" \
            > "$out/end_to_end.log" 2>&1
        echo "end_to_end exit $?" >> "$out/end_to_end.log"
        ;;
    vllm)
        # One device command of at most 600 s: the unpacking, vLLM's start (eager), the
        # gateway's and every cell fit in the script's budget, which ends it with what it
        # measured; vLLM's own log lands in $out/vllm-server.log.
        unpack_vllm_site || exit 2
        echo "[$SECONDS s] sites unpacked"
        SERVE_APP_VLLM_SITE=/tmp/vllm-site PYTHONUNBUFFERED=1 timeout -s INT $((590 - SECONDS)) \
            python3 benchmarks/vllm_upstream.py --budget-s $((575 - SECONDS)) --out "$out" \
            "${@:2}" 2>&1 | tee "$out/vllm_upstream.log"
        echo "vllm_upstream exit ${PIPESTATUS[0]}" | tee -a "$out/vllm_upstream.log"
        ;;
    *)
        echo "usage: $0 tests|end-to-end|long|vllm [ARGS]" >&2
        exit 2
        ;;
esac
