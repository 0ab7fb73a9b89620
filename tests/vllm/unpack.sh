# Sourced (bash) by tests/vllm/gpu-run.sh and benchmarks/gpu_host.sh on the GPU host: unpacks
# the carried sites once while the host is held.
#   unpack_ray_site    Ray Serve's wheels and the gateway's dependencies
#                      (../shared/tools/gpu-wheels.sh: /tmp/parts/part.*) into /tmp/site
#   unpack_vllm_site   the vLLM site (tests/vllm/wheels.sh: /tmp/parts-vllm/part.*) into
#                      /tmp/vllm-site, which vLLM runs with as its only PYTHONPATH
# Parts carried with the run itself (.gpu-wheels/, .gpu-wheels-vllm/) are taken from the
# tree too. Each returns non-zero, saying why, when its site cannot be made.

unpack_ray_site() {
  mkdir -p /tmp/parts
  cp .gpu-wheels/part.* /tmp/parts/ 2>/dev/null
  [ -d /tmp/site/ray ] && return 0
  cat /tmp/parts/part.* | tar x -C /tmp \
    && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/w/*.whl \
    || { echo "Ray wheels: install failed (are all of .gpu-wheels/part.* in /tmp/parts?)"; return 2; }
}

_unxz_tar() {  # the xz tool where the image has it, else Python's lzma
  if command -v xz > /dev/null; then xz -dc | tar x -C /tmp; else python3 -c 'import sys, tarfile
with tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz") as archive:
    archive.extractall("/tmp", filter="tar")'; fi
}

unpack_vllm_site() {
  mkdir -p /tmp/parts-vllm
  cp .gpu-wheels-vllm/part.* .gpu-wheels-vllm/SHA256SUMS /tmp/parts-vllm/ 2>/dev/null
  [ -d /tmp/vllm-site/vllm ] && return 0
  if [ -f /tmp/parts-vllm/SHA256SUMS ]; then
    (cd /tmp/parts-vllm && sha256sum -c --quiet SHA256SUMS) \
      || { echo "vLLM parts missing or damaged"; return 2; }
  fi
  cat /tmp/parts-vllm/part.* | _unxz_tar \
    || { echo "vLLM site: unpacking failed (are all of .gpu-wheels-vllm/part.* in /tmp/parts-vllm?)"; return 2; }
}
