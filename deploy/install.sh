#!/usr/bin/env bash
# Install (or upgrade) this checkout of fractured as a systemd service on Debian 12, as
# root. Idempotent: run it again after `git pull` to upgrade; it never overwrites an
# administrator's /etc/fractured/config.toml.
#
#   /opt/fractured/venv      the package (ONNX Runtime to serve; no torch, no training)
#   /opt/fractured/engines   the shipped engine bundles, one active (fractured engines ...)
#   /etc/fractured/          config.toml (root:fractured 0640), made once from config.toml
#   /var/lib/fractured/      the queue database and the spool (fractured 0700)
#   /etc/systemd/system/fractured.service (+ fractured.service.d/ from the config,
#   and gpu.conf on a node with an NVIDIA GPU)
#
# Usage: deploy/install.sh [--root DIR]
#   --root DIR  stage the same tree under DIR and leave the system alone: no apt-get,
#               useradd, chown or systemctl. For tests and for review; the venv made
#               there only runs from there.
set -euo pipefail
umask 022  # the venv and the engines are read by the service user

SRC=$(cd "$(dirname "$0")/.." && pwd)
SERVICE_USER=fractured
PREFIX=/opt/fractured
VENV=$PREFIX/venv
ENGINES=$PREFIX/engines
STATE=/var/lib/fractured
CONF_DIR=/etc/fractured
CONFIG=$CONF_DIR/config.toml
UNIT_DIR=/etc/systemd/system
UNIT=fractured.service
DROPIN=$UNIT_DIR/$UNIT.d/from-config.conf
# The bundle made active on a first install (as tools/setup.sh does); later installs
# keep whatever an administrator activated since.
DEFAULT_BUNDLE=fractured-0.11.2

say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }

ROOT=""
while (($#)); do
  case $1 in
    --root) (($# >= 2)) || die "--root needs a folder"; ROOT=$2; shift 2 ;;
    --root=*) ROOT=${1#--root=}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option: $1 (usage: install.sh [--root DIR])" >&2; exit 2 ;;
  esac
done
if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT"
  ROOT=$(cd "$ROOT" && pwd)
  say "staging under $ROOT: no packages, user, ownership or systemctl"
elif [ "$(id -u)" -ne 0 ]; then
  die "run as root (or stage the files with --root DIR)"
fi
staging() { [ -n "$ROOT" ]; }

# owner MODE OWNER:GROUP PATH: the mode always; the owner only on the real system.
owner() {
  chmod "$1" "$3"
  staging || chown "$2" "$3"
}

# --- packages and the service user ---------------------------------------------------
if ! staging; then
  need_apt=()
  for package in python3 python3-venv; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
      || need_apt+=("$package")
  done
  if ((${#need_apt[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${need_apt[@]}" >/dev/null
  fi
  if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir "$STATE" --no-create-home \
      --shell /usr/sbin/nologin --comment "fractured DICOM node" "$SERVICE_USER"
    say "created system user $SERVICE_USER"
  fi
fi

# --- folders -------------------------------------------------------------------------
mkdir -p "$ROOT$PREFIX" "$ROOT$STATE/spool" "$ROOT$CONF_DIR" "$ROOT$UNIT_DIR"
owner 0755 root:root "$ROOT$PREFIX"
owner 0700 "$SERVICE_USER:$SERVICE_USER" "$ROOT$STATE"
owner 0700 "$SERVICE_USER:$SERVICE_USER" "$ROOT$STATE/spool"
owner 0750 "root:$SERVICE_USER" "$ROOT$CONF_DIR"

# --- the venv ------------------------------------------------------------------------
[ -x "$ROOT$VENV/bin/python" ] || python3 -m venv "$ROOT$VENV" \
  || die "cannot make a venv at $ROOT$VENV (apt-get install python3-venv)"
# Built from a copy of what the package needs, so that the build leaves nothing in the
# checkout; --upgrade: installed again even when its version did not change.
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
cp -R "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/LICENSE" "$SRC/fractured" "$build/"
"$ROOT$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$build"
say "installed $("$ROOT$VENV/bin/fractured" --version) in $VENV"

# --- engines: bundles are immutable, so one already there is kept as it is -----------
mkdir -p "$ROOT$ENGINES"
for manifest in "$SRC"/engines/*/manifest.json; do
  [ -e "$manifest" ] || continue
  name=$(basename "$(dirname "$manifest")")
  if [ ! -e "$ROOT$ENGINES/$name" ]; then
    rm -rf "$ROOT$ENGINES/.$name.partial"
    cp -R "$(dirname "$manifest")" "$ROOT$ENGINES/.$name.partial"
    chmod -R u=rwX,go=rX "$ROOT$ENGINES/.$name.partial"
    mv "$ROOT$ENGINES/.$name.partial" "$ROOT$ENGINES/$name"
    say "copied engine bundle $name"
  fi
done
if [ ! -s "$ROOT$ENGINES/ACTIVE" ]; then
  [ -d "$ROOT$ENGINES/$DEFAULT_BUNDLE" ] || die "$SRC/engines/$DEFAULT_BUNDLE is missing"
  "$ROOT$VENV/bin/fractured" engines activate "$DEFAULT_BUNDLE" --engines "$ROOT$ENGINES"
fi

# --- the configuration: written once, from the documented defaults ------------------
if [ -e "$ROOT$CONFIG" ]; then
  say "kept $CONFIG (this script never overwrites it)"
else
  # The repository's config.toml with the relative var/ and engines paths pointed at
  # this layout; each replacement must hit, or the defaults changed under this script.
  replacements=(
    'spool_dir = "var/spool"|spool_dir = "'"$STATE"'/spool"'
    'url = "sqlite:///var/fractured.db"|url = "sqlite:///'"$STATE"'/fractured.db"'
    'bundle = "engines"|bundle = "'"$ENGINES"'"'
  )
  text=$(cat "$SRC/config.toml")
  for pair in "${replacements[@]}"; do
    from=${pair%%|*} to=${pair#*|}
    grep -qxF "$from" <<<"$text" || die "$SRC/config.toml has no line '$from' to point at $to"
    text=$(awk -v from="$from" -v to="$to" '$0 == from { print to; next } { print }' <<<"$text")
  done
  {
    echo "# Written by deploy/install.sh from the repository's config.toml on $(date -u +%F)."
    echo "# Edit freely: install.sh never overwrites this file. Restart after a change:"
    echo "# systemctl restart fractured (run install.sh again after changing [node].port"
    echo "# or [node].shutdown_grace_s: the unit's drop-in follows them)."
    echo "#"
    echo "$text"
  } >"$ROOT$CONFIG.partial"
  owner 0640 "root:$SERVICE_USER" "$ROOT$CONFIG.partial"
  mv "$ROOT$CONFIG.partial" "$ROOT$CONFIG"
  say "wrote $CONFIG"
fi
owner 0640 "root:$SERVICE_USER" "$ROOT$CONFIG"  # the service must be able to read it

# --- the unit, and a drop-in for what the configuration asks of it ------------------
install -m 0644 "$SRC/deploy/$UNIT" "$ROOT$UNIT_DIR/$UNIT"
# The node's own loader: a config it would refuse stops the install, naming the key.
# A stop needs the grace for associations, then time for the study being analysed.
read -r port grace needed_stop_s < <("$ROOT$VENV/bin/python" -c '
import math, sys
from fractured import config
try:
    s = config.load(sys.argv[1])
except config.ConfigError as exc:
    sys.exit(f"install.sh: {exc}")
grace = s.node.shutdown_grace_s
print(s.node.port, grace, math.ceil(grace) + 90)' "$ROOT$CONFIG") || die "fix $CONFIG and run again"
unit_stop_s=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)$/\1/p' "$ROOT$UNIT_DIR/$UNIT")
dropin=""
if ((port < 1024)); then
  dropin+="# [node].port = $port is below 1024: binding it needs this one capability."$'\n'
  dropin+="CapabilityBoundingSet=CAP_NET_BIND_SERVICE"$'\n'
  dropin+="AmbientCapabilities=CAP_NET_BIND_SERVICE"$'\n'
fi
if ((needed_stop_s > unit_stop_s)); then
  dropin+="# [node].shutdown_grace_s = $grace, then the study being analysed."$'\n'
  dropin+="TimeoutStopSec=$needed_stop_s"$'\n'
fi
if [ -n "$dropin" ]; then
  mkdir -p "$(dirname "$ROOT$DROPIN")"
  printf '# Written by deploy/install.sh from %s; run it again after changing it.\n[Service]\n%s' \
    "$CONFIG" "$dropin" >"$ROOT$DROPIN"
  chmod 0644 "$ROOT$DROPIN"
  say "wrote $DROPIN"
elif [ -e "$ROOT$DROPIN" ]; then
  rm "$ROOT$DROPIN"
  rmdir --ignore-fail-on-non-empty "$(dirname "$ROOT$DROPIN")"
  say "removed $DROPIN (the configuration no longer needs it)"
fi

# A GPU node: the unit hides /dev, so the GPU's devices are let in by a drop-in.
GPU_DROPIN=$UNIT_DIR/$UNIT.d/gpu.conf
if [ -e /dev/nvidiactl ]; then
  mkdir -p "$(dirname "$ROOT$GPU_DROPIN")"
  install -m 0644 "$SRC/deploy/gpu.conf" "$ROOT$GPU_DROPIN"
  say "wrote $GPU_DROPIN (an NVIDIA GPU is present: /dev/nvidiactl)"
elif [ -e "$ROOT$GPU_DROPIN" ]; then
  rm "$ROOT$GPU_DROPIN"
  rmdir --ignore-fail-on-non-empty "$(dirname "$ROOT$GPU_DROPIN")"
  say "removed $GPU_DROPIN (no NVIDIA GPU here)"
fi

# --- start it ------------------------------------------------------------------------
if staging; then
  say "staged under $ROOT"
elif [ ! -d /run/systemd/system ]; then
  say "systemd is not running here: installed, not started"
else
  systemctl daemon-reload
  systemctl enable --quiet "$UNIT"
  systemctl restart "$UNIT"  # an upgrade runs the new code
  say "started $UNIT: systemctl status fractured; journalctl -u fractured -f"
fi
