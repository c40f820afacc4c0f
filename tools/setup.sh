#!/usr/bin/env bash
# Install what the node and its tests need on a fresh Debian machine, idempotently:
# the DICOM peers the tests talk to (DCMTK, Orthanc, dicom3tools) and a venv in .venv
# with the package, its training extra (torch) and its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for tool in storescu:dcmtk Orthanc:orthanc dciodvfy:dicom3tools; do
  command -v "${tool%%:*}" >/dev/null || need_apt+=("${tool#*:}")
done
if ((${#need_apt[@]})); then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends \
    "${need_apt[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: other versions download gigabytes or break torchvision.
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[train,test]'

# The node's default engine bundle: until a trained model ships, an untrained one with
# the classifier and the box detector (every result it makes says UNTRAINED MODEL).
# A bundle of an older schema is rebuilt; a bundle is never changed in place.
if ! .venv/bin/python -c 'import sys; from fractured.engine.bundle import Bundle
Bundle.load(sys.argv[1])' engines/default 2>/dev/null; then
  rm -rf engines/default
  .venv/bin/fractured build-engine --untrained --out engines/default \
    --detector mobilenet_v3_large_fpn
fi
# config.toml runs the engines folder's active bundle: the default one until another
# is activated (fractured engines activate NAME).
[ -s engines/ACTIVE ] || .venv/bin/fractured engines activate default --engines engines
