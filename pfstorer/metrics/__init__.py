"""Image-quality and identity metrics for face restoration, each labelled with the backend that made it.

Full-reference (restored vs ground truth): ``psnr``, ``ssim``, ``st_lpips``, ``id_facenet``,
``id_dlib``, ``lmse``, ``sharpness`` (fine detail of the face box over the truth's; 1 is as sharp
as the truth). With reference photos of the person: ``id_refs_facenet``, ``id_refs_dlib``
(mean cosine of the restored face to each reference). No-reference: ``niqe``, ``brisque``.

The learned metrics need the optional ``eval`` extra (models shipped inside registry packages, see
``scripts/install_eval_models.sh``). A missing model makes its metric *unavailable* with a reason
(:func:`available_metrics`); it is never downloaded and never crashes :func:`compute_metrics`.
Differences from the paper: ST-LPIPS instead of LPIPS, FaceNet/dlib cosine (not x 100) instead of
ArcFace, NIQE and BRISQUE instead of MUSIQ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pfstorer.errors import InputError, PFStorerError
from pfstorer.metrics._image import ImageLike, as_float_rgb
from pfstorer.metrics._models import MetricUnavailableError
from pfstorer.metrics.fullref import PSNR_BACKEND, SSIM_BACKEND, STLPIPS_BACKEND, psnr, ssim, stlpips
from pfstorer.metrics.identity import FaceBox, IdentityEmbedder, find_face, get_embedder, id_cosine, lmse
from pfstorer.metrics.noref import BRISQUE_BACKEND, NIQE_BACKEND, brisque, niqe
from pfstorer.metrics.sharpness import SHARPNESS_BACKEND, face_sharpness

__all__ = [
    "METRICS",
    "FaceBox",
    "IdentityEmbedder",
    "MetricResult",
    "MetricSpec",
    "MetricUnavailableError",
    "available_metrics",
    "brisque",
    "compute_metrics",
    "face_sharpness",
    "find_face",
    "get_embedder",
    "id_cosine",
    "lmse",
    "niqe",
    "psnr",
    "ssim",
    "stlpips",
]

Kind = Literal["full-reference", "references", "no-reference"]


@dataclass(frozen=True)
class MetricResult:
    """One score, the backend that produced it, and why it is missing when ``value`` is None."""

    name: str
    value: float | None
    backend: str  # what produced the value, or "unavailable"
    note: str = ""  # why value is None (missing model, no face, image too small)
    higher_is_better: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["value"] is not None and not math.isfinite(d["value"]):
            d["value"] = str(d["value"])  # JSON has no inf; "inf" keeps PSNR of identical images honest
        return d


@dataclass(frozen=True)
class MetricSpec:
    """How to compute a metric and how to report it."""

    name: str
    label: str  # column header, e.g. "ST-LPIPS"
    kind: Kind
    higher_is_better: bool | None  # None: closer to a target is better (sharpness: 1)
    backend: Callable[[], str]  # raises MetricUnavailableError when the model is missing


def _facenet_backend() -> str:
    return get_embedder("facenet").description


def _dlib_backend() -> str:
    return get_embedder("dlib").description


def _stlpips_backend() -> str:
    from pfstorer.metrics.fullref import _stlpips_model

    _stlpips_model("alex")
    return STLPIPS_BACKEND


def _niqe_backend() -> str:
    from pfstorer.metrics.noref import _niqe_params

    _niqe_params()
    return NIQE_BACKEND


def _brisque_backend() -> str:
    from pfstorer.metrics._models import find_brisque_models

    find_brisque_models()
    return BRISQUE_BACKEND


def _lmse_backend() -> str:
    from pfstorer.metrics.identity import _dlib_models, detector_name

    _dlib_models()
    return (
        "dlib 68 landmarks (shape_predictor_68_face_landmarks), px^2 at a 128 px wide face box, "
        f"detector {detector_name()}"
    )


METRICS: dict[str, MetricSpec] = {
    s.name: s
    for s in (
        MetricSpec("psnr", "PSNR", "full-reference", True, lambda: PSNR_BACKEND),
        MetricSpec("ssim", "SSIM", "full-reference", True, lambda: SSIM_BACKEND),
        MetricSpec("st_lpips", "ST-LPIPS", "full-reference", False, _stlpips_backend),
        MetricSpec("id_facenet", "ID FaceNet", "full-reference", True, _facenet_backend),
        MetricSpec("id_dlib", "ID dlib", "full-reference", True, _dlib_backend),
        MetricSpec("lmse", "LMSE", "full-reference", False, _lmse_backend),
        MetricSpec("sharpness", "sharpness", "full-reference", None, lambda: SHARPNESS_BACKEND),
        MetricSpec("id_refs_facenet", "ID-refs FaceNet", "references", True, _facenet_backend),
        MetricSpec("id_refs_dlib", "ID-refs dlib", "references", True, _dlib_backend),
        MetricSpec("niqe", "NIQE", "no-reference", False, _niqe_backend),
        MetricSpec("brisque", "BRISQUE", "no-reference", False, _brisque_backend),
    )
}


def _backend_or_reason(spec: MetricSpec) -> tuple[str | None, str]:
    try:
        return spec.backend(), ""
    except MetricUnavailableError as exc:
        return None, str(exc)
    except Exception as exc:  # a broken optional install (bad wheel, ABI clash) is a reason, not a crash
        return None, f"{type(exc).__name__}: {exc}"


def available_metrics() -> dict[str, str]:
    """Every metric name -> its backend, or ``"unavailable: <reason>"`` when its model is missing.

    Loads each model once (cached afterwards), so the answer reflects what really works here.
    """
    out: dict[str, str] = {}
    for name, spec in METRICS.items():
        backend, reason = _backend_or_reason(spec)
        out[name] = backend if backend is not None else f"unavailable: {reason}"
    return out


def _id_refs(
    pred_rgb: Any, refs: Sequence[ImageLike], backend: Literal["facenet", "dlib"]
) -> tuple[float | None, str]:
    emb = get_embedder(backend)
    e = emb.embed(pred_rgb)
    if e is None:
        return None, "no face found in the restored image"
    sims = []
    for r in refs:
        er = emb.embed(r)
        if er is not None:
            sims.append(float(e @ er))
    if not sims:
        return None, "no face found in any reference"
    skipped = len(refs) - len(sims)
    return sum(sims) / len(sims), f"{skipped} reference(s) without a face skipped" if skipped else ""


def _compute_one(
    name: str, pred: Any, gt: Any, refs: Sequence[ImageLike] | None, gt_box: FaceBox | None
) -> tuple[float | None, str]:
    if name == "psnr":
        return psnr(pred, gt), ""
    if name == "ssim":
        return ssim(pred, gt), ""
    if name == "st_lpips":
        return stlpips(pred, gt), ""
    if name in ("id_facenet", "id_dlib"):
        emb = get_embedder("facenet" if name == "id_facenet" else "dlib")
        eg = emb.embed(gt)
        if eg is None:
            return None, "no face found in the ground truth"
        # the ground truth's face box for both: restoration artefacts must not move the crop
        ep = emb.embed(pred, box=gt_box) if gt_box is not None else emb.embed(pred)
        if ep is None:
            return None, "no face found in the restored image"
        return float(ep @ eg), ""
    if name == "lmse":
        v = lmse(pred, gt)
        return v, "" if v is not None else "no face found in the ground truth"
    if name == "sharpness":
        v = face_sharpness(pred, gt, box=gt_box)
        return v, "" if v is not None else "the ground truth's face has no detail"
    if name in ("id_refs_facenet", "id_refs_dlib"):
        assert refs is not None
        return _id_refs(pred, refs, "facenet" if name.endswith("facenet") else "dlib")
    if name == "niqe":
        return niqe(pred), ""
    if name == "brisque":
        return brisque(pred), ""
    raise InputError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")


def compute_metrics(
    pred: ImageLike,
    gt: ImageLike | None = None,
    refs: Sequence[ImageLike] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, MetricResult]:
    """Score one restored image; returns name -> :class:`MetricResult` in :data:`METRICS` order.

    ``names=None`` means every metric the inputs allow (full-reference ones need ``gt``, the
    ``id_refs_*`` ones need ``refs``). A metric whose model is missing, or whose image has no face,
    comes back with ``value=None`` and the reason in ``note``; bad inputs raise :class:`InputError`.
    """
    if names is None:
        wanted = [
            n
            for n, s in METRICS.items()
            if (s.kind != "full-reference" or gt is not None) and (s.kind != "references" or refs)
        ]
    else:
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            raise InputError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
        wanted = [n for n in METRICS if n in set(names)]
    pred_rgb = as_float_rgb(pred)  # decode paths once
    gt_rgb = as_float_rgb(gt) if gt is not None else None
    if gt_rgb is not None and gt_rgb.shape != pred_rgb.shape:
        raise InputError(
            f"restored image is {pred_rgb.shape[1]}x{pred_rgb.shape[0]} but ground truth is "
            f"{gt_rgb.shape[1]}x{gt_rgb.shape[0]}; they must be the same size"
        )
    gt_box: FaceBox | None = None
    if gt_rgb is not None and any(n == "sharpness" or (n.startswith("id_") and not n.startswith("id_refs")) for n in wanted):
        try:
            gt_box = find_face(gt_rgb)
        except Exception:  # detector missing: each embedder then finds its own face
            gt_box = None
    out: dict[str, MetricResult] = {}
    for name in wanted:
        spec = METRICS[name]
        backend, reason = _backend_or_reason(spec)
        if backend is None:
            out[name] = MetricResult(name, None, "unavailable", reason, spec.higher_is_better)
            continue
        if spec.kind == "full-reference" and gt_rgb is None:
            out[name] = MetricResult(name, None, backend, "needs a ground truth image", spec.higher_is_better)
            continue
        if spec.kind == "references" and not refs:
            out[name] = MetricResult(name, None, backend, "needs reference photos", spec.higher_is_better)
            continue
        try:
            value, note = _compute_one(name, pred_rgb, gt_rgb, refs, gt_box)
        except MetricUnavailableError as exc:
            value, note = None, str(exc)
        except PFStorerError as exc:
            if name in ("niqe", "brisque"):  # e.g. an image too small for NIQE: say so, keep the rest
                value, note = None, str(exc)
            else:
                raise
        out[name] = MetricResult(name, value, backend, note, spec.higher_is_better)
    return out
