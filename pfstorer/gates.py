"""The quality a base model must reach on unseen faces before anything built on it counts.

One definition for the benchmark (``benchmarks/bench_base.py``) and the test of the shipped weights
(``tests/unit/test_compact.py``). Inputs are mean scores of the degraded inputs and of their restorations
against the originals: ``psnr`` (dB), ``st_lpips``, ``id_facenet`` (FaceNet cosine x 100) and
``sharpness`` (the face's fine detail over the truth's, :mod:`pfstorer.metrics.sharpness`).

Two suites: ``lfw128`` (128 px news-photo crops, faces of ~90 px) and ``faces1024`` (studio
portraits at 512 px, faces of ~230 px, where fine skin, eye and hair detail exists to be restored).
"""

from __future__ import annotations

from collections.abc import Mapping

LEVELS = ("heavy", "light", "clean")
PHOTO_LEVELS = ("heavy", "light", "x4")


def base_gates(level: str, inp: Mapping[str, float], out: Mapping[str, float]) -> list[tuple[str, bool]]:
    """The named gates of one degradation level and whether each holds.

    - heavy: PSNR >= input + 0.5 dB, ST-LPIPS <= input - 0.05, ID >= input + 2 (it restores);
    - light: PSNR >= input - 0.3 dB, ID >= input - 1 (a good photo is never made worse);
    - clean (the original itself as input): PSNR >= 35 dB.
    """
    if level == "heavy":
        return [("PSNR >= input + 0.5", out["psnr"] >= inp["psnr"] + 0.5),
                ("ST-LPIPS <= input - 0.05", out["st_lpips"] <= inp["st_lpips"] - 0.05),
                ("ID >= input + 2", out["id_facenet"] >= inp["id_facenet"] + 2)]
    if level == "light":
        return [("PSNR >= input - 0.3", out["psnr"] >= inp["psnr"] - 0.3),
                ("ID >= input - 1", out["id_facenet"] >= inp["id_facenet"] - 1)]
    if level == "clean":
        return [("PSNR >= 35", out["psnr"] >= 35.0)]
    raise ValueError(f"unknown level {level!r}; known: {', '.join(LEVELS)}")


def photo_gates(level: str, inp: Mapping[str, float], out: Mapping[str, float]) -> list[tuple[str, bool]]:
    """The gates of one level of the faces1024 suite at 512 px (``x4``: super-resolution from
    128 px with a light degradation, whose input is the bicubic upscale).

    - heavy: PSNR >= input + 1 dB, ID >= input + 8, ST-LPIPS <= input - 0.10, sharpness in [0.6, 1.4];
    - x4: PSNR >= bicubic + 1.5 dB, ID >= bicubic + 5, sharpness >= 0.6;
    - light: PSNR >= input, ID >= input - 0.5.
    """
    if level == "heavy":
        return [("PSNR >= input + 1", out["psnr"] >= inp["psnr"] + 1.0),
                ("ID >= input + 8", out["id_facenet"] >= inp["id_facenet"] + 8),
                ("ST-LPIPS <= input - 0.10", out["st_lpips"] <= inp["st_lpips"] - 0.10),
                ("sharpness in [0.6, 1.4]", 0.6 <= out["sharpness"] <= 1.4)]
    if level == "x4":
        return [("PSNR >= bicubic + 1.5", out["psnr"] >= inp["psnr"] + 1.5),
                ("ID >= bicubic + 5", out["id_facenet"] >= inp["id_facenet"] + 5),
                ("sharpness >= 0.6", out["sharpness"] >= 0.6)]
    if level == "light":
        return [("PSNR >= input", out["psnr"] >= inp["psnr"]),
                ("ID >= input - 0.5", out["id_facenet"] >= inp["id_facenet"] - 0.5)]
    raise ValueError(f"unknown level {level!r}; known: {', '.join(PHOTO_LEVELS)}")
