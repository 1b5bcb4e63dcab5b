"""The quality a base model must reach on unseen faces before anything built on it counts.

One definition for the benchmark (``benchmarks/bench_base.py``) and the test of the shipped weights
(``tests/test_compact.py``). Inputs are mean scores of the degraded inputs and of their restorations
against the originals: ``psnr`` (dB), ``st_lpips``, ``id_facenet`` (FaceNet cosine x 100).
"""

from __future__ import annotations

from collections.abc import Mapping

LEVELS = ("heavy", "light", "clean")


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
