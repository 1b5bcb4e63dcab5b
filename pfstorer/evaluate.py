"""`pfstorer evaluate`: score a folder of restored faces against their ground truth.

Files are paired by name without extension (``a.png`` restored <-> ``a.jpg`` ground truth). Writes
``metrics.md`` (for people), ``metrics.json`` (for programs), ``metrics.csv`` (for spreadsheets):
one row per image plus the mean, every metric labelled with its backend, and ``grid.png``: one row
per image, columns input | restored | ground truth (input only with ``--input``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pfstorer.errors import InputError

GRID_PAD = 4  # px between cells and around the grid
GRID_HEADER = 22  # px of the band holding the column labels
GRID_MAX_SIDE = 256  # cells are at most this many px on their longer side
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


# --- grid -----------------------------------------------------------------------------------------
def _fit(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Scale ``img`` to fit inside h x w keeping its aspect, centred on white (nearest when
    enlarging, so a tiny low-quality input shows its real pixels instead of invented smoothness)."""
    img = img.detach().to("cpu", torch.float32).clamp(0, 1)
    if img.ndim == 2:
        img = img[None]
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    ih, iw = img.shape[-2:]
    s = min(h / ih, w / iw)
    nh, nw = max(1, min(h, round(ih * s))), max(1, min(w, round(iw * s)))
    if (nh, nw) != (ih, iw):
        if s < 1:
            img = F.interpolate(
                img[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True
            )[0]
        else:
            img = F.interpolate(img[None], size=(nh, nw), mode="nearest-exact")[0]
    cell = torch.ones(3, h, w)
    y0, x0 = (h - nh) // 2, (w - nw) // 2
    cell[:, y0 : y0 + nh, x0 : x0 + nw] = img.clamp(0, 1)
    return cell


def _draw_text(
    canvas: np.ndarray, xy: tuple[int, int], text: str, max_width: int, *, box: bool = False
) -> None:
    """Write ``text`` onto an H x W x 3 uint8 array in place (PIL's built-in font: works offline)."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    while text and draw.textlength(text, font=font) > max_width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    if not text:
        return
    if box:
        x0, y0, x1, y1 = draw.textbbox(xy, text, font=font)
        draw.rectangle((x0 - 2, y0 - 2, x1 + 2, y1 + 2), fill=(0, 0, 0))
        draw.text(xy, text, fill=(255, 255, 255), font=font)
    else:
        draw.text(xy, text, fill=(0, 0, 0), font=font)
    canvas[...] = np.asarray(im)


def make_grid(
    rows: list[list[torch.Tensor]],
    labels: list[str],
    *,
    row_labels: Sequence[str] | None = None,
    max_side: int = GRID_MAX_SIDE,
) -> torch.Tensor:
    """Side-by-side comparison sheet as a ``[3, H, W]`` tensor in [0, 1].

    Every cell has the same size: the largest image shape, shrunk so that its longer side is at most
    ``max_side``; each image is fitted inside its cell. ``labels`` head the columns (empty list: no
    header band); ``row_labels`` are written in the corner of each row's first cell. Size:
    ``W = cols*cell_w + (cols+1)*GRID_PAD``, ``H = header + rows*cell_h + (rows+1)*GRID_PAD`` with
    header ``GRID_HEADER`` when labels are given, else 0.
    """
    if not rows or not rows[0]:
        raise InputError("make_grid needs at least one row with one image")
    ncols = len(rows[0])
    if any(len(r) != ncols for r in rows):
        raise InputError("make_grid: every row needs the same number of images")
    if labels and len(labels) != ncols:
        raise InputError(f"make_grid: {len(labels)} labels for {ncols} columns")
    if row_labels is not None and len(row_labels) != len(rows):
        raise InputError(f"make_grid: {len(row_labels)} row labels for {len(rows)} rows")
    cell_h = cell_w = 1
    for r in rows:
        for img in r:
            ih, iw = int(img.shape[-2]), int(img.shape[-1])
            s = min(1.0, max_side / max(ih, iw))
            cell_h, cell_w = max(cell_h, round(ih * s)), max(cell_w, round(iw * s))
    header = GRID_HEADER if labels else 0
    H = header + len(rows) * cell_h + (len(rows) + 1) * GRID_PAD
    W = ncols * cell_w + (ncols + 1) * GRID_PAD
    grid = torch.ones(3, H, W)
    for i, r in enumerate(rows):
        y = header + GRID_PAD + i * (cell_h + GRID_PAD)
        for j, img in enumerate(r):
            x = GRID_PAD + j * (cell_w + GRID_PAD)
            grid[:, y : y + cell_h, x : x + cell_w] = _fit(img, cell_h, cell_w)
    if not labels and row_labels is None:
        return grid
    canvas = np.ascontiguousarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    for j, text in enumerate(labels):
        _draw_text(canvas, (GRID_PAD + j * (cell_w + GRID_PAD) + 2, 4), text, cell_w - 4)
    for i, text in enumerate(row_labels or []):
        y = header + GRID_PAD + i * (cell_h + GRID_PAD)
        _draw_text(canvas, (GRID_PAD + 4, y + 4), text, cell_w - 8, box=True)
    return torch.from_numpy(canvas).permute(2, 0, 1).float().div(255.0)


# --- folders --------------------------------------------------------------------------------------
def _index(folder: Path, what: str) -> dict[str, Path]:
    """Image files of a folder (one level) by name without extension."""
    if not folder.is_dir():
        raise InputError(f"{what} folder {folder} does not exist")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in out:
                raise InputError(
                    f"{what} folder has two images named {p.stem!r}: {out[p.stem].name}, {p.name}"
                )
            out[p.stem] = p
    return out


def _load(path: Path) -> torch.Tensor:
    from pfstorer.images import load_image

    return load_image(path)


_ARROWS = {True: "↑", False: "↓", None: "→1"}  # None: best at 1 (sharpness relative to the truth)


@dataclass
class EvaluationReport:
    """Scores of one evaluation run and where its files were written."""

    images: list[str]
    per_image: dict[str, dict[str, Any]]  # image -> metric -> MetricResult
    metrics: list[str]
    labels: dict[str, str]
    backends: dict[str, str]
    higher_is_better: dict[str, bool | None]
    means: dict[str, float | None]
    counts: dict[str, int]
    notes: dict[str, list[str]]  # metric -> distinct reasons for missing values
    unmatched_pred: list[str] = field(default_factory=list)
    unmatched_gt: list[str] = field(default_factory=list)
    grid_rows: int = 0
    files: dict[str, Path] = field(default_factory=dict)

    def value(self, image: str, metric: str) -> float | None:
        return self.per_image[image][metric].value

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``inf`` as the string "inf": JSON has no infinity)."""
        return {
            "n_images": len(self.images),
            "metrics": {
                m: {
                    "label": self.labels[m],
                    "backend": self.backends[m],
                    "higher_is_better": self.higher_is_better[m],
                    "mean": _json_num(self.means[m]),
                    "count": self.counts[m],
                    "notes": self.notes[m],
                }
                for m in self.metrics
            },
            "images": [
                {
                    "name": name,
                    "values": {m: _json_num(self.per_image[name][m].value) for m in self.metrics},
                    "notes": {
                        m: self.per_image[name][m].note for m in self.metrics if self.per_image[name][m].note
                    },
                }
                for name in self.images
            ],
            "unmatched": {"pred": self.unmatched_pred, "gt": self.unmatched_gt},
            "grid_rows": self.grid_rows,
        }

    def markdown(self) -> str:
        """The per-image and mean table with its legend, as written to ``metrics.md``."""
        head = ["image"] + [
            f"{self.labels[m]} {_ARROWS[self.higher_is_better[m]]}" for m in self.metrics
        ]
        lines = ["# Evaluation", "", f"{len(self.images)} image(s).", ""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in self.images:
            lines.append(
                "| " + " | ".join([name] + [_fmt(self.per_image[name][m].value) for m in self.metrics]) + " |"
            )
        lines.append(
            "| " + " | ".join(["**mean**"] + [f"**{_fmt(self.means[m])}**" for m in self.metrics]) + " |"
        )
        lines += ["", "## Backends", ""]
        lines += [f"- **{self.labels[m]}** (`{m}`): {self.backends[m]}" for m in self.metrics]
        missing = [(m, n) for m in self.metrics for n in self.notes[m]]
        if missing:
            lines += ["", "## Missing values", ""]
            lines += [f"- **{self.labels[m]}**: {n}" for m, n in missing]
        if self.unmatched_pred or self.unmatched_gt:
            lines += ["", "## Unpaired files (skipped)", ""]
            if self.unmatched_pred:
                lines.append(f"- restored without ground truth: {', '.join(self.unmatched_pred)}")
            if self.unmatched_gt:
                lines.append(f"- ground truth without restored: {', '.join(self.unmatched_gt)}")
        lines += [
            "",
            "Notes: ST-LPIPS is shift-tolerant LPIPS, not numerically the paper's LPIPS; ID is the cosine "
            "(not x 100) of FaceNet or dlib embeddings, not ArcFace; ID-refs is the mean cosine of the restored "
            "face to each reference photo; NIQE and BRISQUE replace MUSIQ (no offline weights). "
            "PSNR on RGB, SSIM on the BT.601 luma; LMSE in px^2 of a 128 px wide face box.",
            "",
        ]
        if self.grid_rows:
            lines += ["![comparison grid](grid.png)", ""]
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if math.isinf(v):
        return "inf"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"


def _json_num(v: float | None) -> float | str | None:
    if v is None or math.isfinite(v):
        return v
    return str(v)


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    refs_dir: str | os.PathLike | None = None,
    input_dir: str | os.PathLike | None = None,
    metrics: Sequence[str] | None = None,
    grid_rows: int = 32,
) -> EvaluationReport:
    """Score every restored image that has a ground truth of the same name; write the tables and grid.

    ``refs_dir``: photos of the (one) person; adds ``id_refs_*`` (mean cosine to the references).
    ``input_dir``: the degraded inputs, shown as the grid's first column. ``metrics``: names from
    :data:`pfstorer.metrics.METRICS` (default: every one the inputs allow; unavailable ones are
    reported as n/a with the reason). The grid shows the first ``grid_rows`` images (0: no grid).
    """
    from pfstorer.images import save_image
    from pfstorer.metrics import METRICS, compute_metrics

    preds, gts = _index(Path(pred_dir), "restored"), _index(Path(gt_dir), "ground truth")
    names = sorted(set(preds) & set(gts))
    if not names:
        raise InputError(f"no restored image in {pred_dir} has a ground truth of the same name in {gt_dir}")
    refs = [_load(p) for p in _index(Path(refs_dir), "references").values()] if refs_dir is not None else None
    if refs is not None and not refs:
        raise InputError(f"references folder {refs_dir} holds no image")
    inputs = _index(Path(input_dir), "input") if input_dir is not None else None

    per_image: dict[str, dict[str, Any]] = {}
    grid_rows_imgs: list[list[torch.Tensor]] = []
    for name in names:
        pred, gt = _load(preds[name]), _load(gts[name])
        if pred.shape != gt.shape:
            raise InputError(
                f"{name}: restored image is {pred.shape[2]}x{pred.shape[1]} but ground truth is "
                f"{gt.shape[2]}x{gt.shape[1]}; they must be the same size"
            )
        per_image[name] = compute_metrics(pred, gt, refs=refs, names=metrics)
        if len(grid_rows_imgs) < grid_rows:
            row = [pred, gt]
            if inputs is not None:
                row.insert(0, _load(inputs[name]) if name in inputs else torch.full((3, 8, 8), 0.5))
            grid_rows_imgs.append(row)

    used = [m for m in METRICS if m in per_image[names[0]]]
    backends: dict[str, str] = {}
    for m in used:
        seen = [per_image[n][m].backend for n in names if per_image[n][m].backend != "unavailable"]
        backends[m] = seen[0] if seen else "unavailable"
    means: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    notes: dict[str, list[str]] = {}
    for m in used:
        vals = [per_image[n][m].value for n in names if per_image[n][m].value is not None]
        counts[m] = len(vals)
        means[m] = float(np.mean(vals)) if vals else None
        notes[m] = sorted(
            {per_image[n][m].note for n in names if per_image[n][m].value is None and per_image[n][m].note}
        )
    report = EvaluationReport(
        images=names,
        per_image=per_image,
        metrics=used,
        labels={m: METRICS[m].label for m in used},
        backends=backends,
        higher_is_better={m: METRICS[m].higher_is_better for m in used},
        means=means,
        counts=counts,
        notes=notes,
        unmatched_pred=sorted(set(preds) - set(gts)),
        unmatched_gt=sorted(set(gts) - set(preds)),
        grid_rows=len(grid_rows_imgs),
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {k: out / f for k, f in (("md", "metrics.md"), ("json", "metrics.json"), ("csv", "metrics.csv"))}
    files["md"].write_text(report.markdown(), encoding="utf-8")
    files["json"].write_text(json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    with open(files["csv"], "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image"] + used)
        for name in names:
            w.writerow(
                [name] + ["" if (v := per_image[name][m].value) is None else repr(float(v)) for m in used]
            )
        w.writerow(["mean"] + ["" if means[m] is None else repr(float(means[m])) for m in used])  # type: ignore[arg-type]
    if grid_rows_imgs:
        labels = (["input"] if inputs is not None else []) + ["restored", "ground truth"]
        grid = make_grid(grid_rows_imgs, labels, row_labels=names[: len(grid_rows_imgs)])
        files["grid"] = out / "grid.png"
        save_image(grid, files["grid"])
    report.files = files
    return report


# --- CLI ------------------------------------------------------------------------------------------
def run_cli(args: argparse.Namespace) -> int:
    """``pfstorer evaluate``: score the folders, print the means, write the reports."""
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    report = evaluate_folders(
        args.pred,
        args.gt,
        args.out,
        refs_dir=args.refs,
        input_dir=args.input,
        metrics=metrics,
        grid_rows=args.grid_rows,
    )
    print(f"evaluated {len(report.images)} image(s)")
    for m in report.metrics:
        print(f"  {report.labels[m]:<16} {_fmt(report.means[m]):>10}   ({report.backends[m]})")
    if report.unmatched_pred or report.unmatched_gt:
        print(f"  skipped {len(report.unmatched_pred) + len(report.unmatched_gt)} file(s) without a partner")
    for path in report.files.values():
        print(f"wrote {path}")
    return 0
