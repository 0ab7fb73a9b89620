#!/usr/bin/env bash
# Packs vLLM for the GPU host (Python 3.12, x86_64, torch 2.11.0+cu130): the wheels that
# tests/vllm/wheels.txt pins, installed here into one folder, vllm-site/, as pip installs
# them there (--target, --no-deps), then tar'd, xz-compressed and split into parts of at
# most 60 MB, since a transfer to that host takes at most 64 MiB at a time. An installed
# tree compresses to about two thirds of its wheels (zip members are deflated one by one),
# which saves a transfer or two, and the host needs no pip for it.
#
# Run from the project's root:   bash tests/vllm/wheels.sh
# It writes .gpu-wheels-vllm/part.00, part.01, ... and SHA256SUMS (ignored through
# .git/info/exclude). Land each part in the host's /tmp/parts-vllm/ with one run per part
# (carry `.gpu-wheels-vllm/part.NN`; command `mkdir -p /tmp/parts-vllm && cp
# .gpu-wheels-vllm/part.NN /tmp/parts-vllm/`) while the host stays warm, then run
# tests/vllm/gpu-run.sh there, which unpacks it into /tmp/vllm-site.
# xz -9 over ~800 MB takes about 10 minutes of two busy cores; XZ_OPT=-6 is faster and
# about 10% larger.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx '/.gpu-wheels-vllm/' "$exclude" 2>/dev/null || echo '/.gpu-wheels-vllm/' >> "$exclude"
pip=(${PIP:-python3 -m pip})
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=()
for n in 34 31 28 27 26 24 17 12 5; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"${pip[@]}" install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 \
  --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform any \
  --target "$work/vllm-site" -r tests/vllm/wheels.txt \
  2> >(grep -v 'is ignored: it is neither' >&2)
# Console scripts name this machine's interpreter; the host runs `python3 -m vllm...`.
rm -rf "$work/vllm-site/bin"
rm -rf .gpu-wheels-vllm && mkdir -p .gpu-wheels-vllm
tar cf - --sort=name --owner=0 --group=0 -C "$work" vllm-site \
  | xz -T0 ${XZ_OPT:--9} | split -b 60000000 -d - .gpu-wheels-vllm/part.
(cd .gpu-wheels-vllm && sha256sum part.* > SHA256SUMS)
n=$(ls .gpu-wheels-vllm/part.* | wc -l)
echo "wrote $n parts in .gpu-wheels-vllm/ ($(du -sh .gpu-wheels-vllm | cut -f1));" \
  "land each in the host's /tmp/parts-vllm/, then run tests/vllm/gpu-run.sh there"
