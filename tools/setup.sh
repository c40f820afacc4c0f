#!/usr/bin/env bash
# Install what the node and its tests need on a fresh Debian machine, idempotently:
# the DICOM peers the tests talk to (DCMTK, Orthanc, dicom3tools; openssl makes their
# TLS certificates), PostgreSQL's server (the tests start a cluster of their own: no
# service is needed), systemd (systemd-analyze checks the unit), prometheus (promtool
# checks the alert rules in docs/monitoring), the viewers the browser tests read results
# in (Orthanc's DICOMweb and Web Viewer plugins, Chromium and its driver; OHIF's built
# app by tools/install_ohif.py) and a venv in .venv with the package, its training
# extra (torch) and its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."

# By package, not by command: pynetdicom installs its own `storescu` and `echoscu`
# into the venv, which would hide a missing DCMTK from an activated shell.
need_apt=()
for package in dcmtk orthanc dicom3tools openssl postgresql systemd prometheus \
               orthanc-dicomweb orthanc-webviewer chromium chromium-driver; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || need_apt+=("$package")
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
.venv/bin/python tools/install_ohif.py

# The node's default model ships in the repository: engines/fractured-0.11.2, trained on
# FracAtlas (its MODEL_CARD.md has the data, the metrics and the limits; 0.10.2, the same
# model in float32 arithmetic, stays for GPU nodes, and 0.11.1 (the same models, its
# region check's floor 98 % instead of 99 %) and 0.8.1 (the ResNet18 model) for
# `fractured engines rollback`). A fresh install
# makes it the active bundle; a node that already has one active keeps it, unless that
# bundle has left the repository since (older shipped versions are in git history).
active=$(cat engines/ACTIVE 2>/dev/null || true)
if [ -z "$active" ] || [ ! -f "engines/$active/manifest.json" ]; then
  .venv/bin/fractured engines activate fractured-0.11.2 --engines engines
fi
