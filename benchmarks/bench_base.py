"""Does the base model restore? Its quality gates on unseen faces, at the CLI's defaults.

Two suites, both of people the base never trained on:

- ``lfw128``: each of the first ``--people`` LFW bench people with enough photos gives its held-out
  photos (the ones after the 5 personalization references, ``--per-person`` of them), 128 px crops
  with faces of ~90 px; levels ``heavy``, ``light`` and ``clean`` (the original itself: p_HQ);
  gates :func:`pfstorer.gates.base_gates`.
- ``faces1024``: the 78 photos of the faces1024 bench split (44 people; London and Canada studio
  sets, CC BY 4.0), shrunk so the long side is ``--size`` (512) px, faces of ~230 px; levels
  ``heavy``, ``light`` and ``x4`` (shrunk 4x to 128 px, degraded ``light``, restored with
  ``--scale 4``; its input row is the bicubic upscale that restore starts from); gates
  :func:`pfstorer.gates.photo_gates`, and the compute per 512 px photo (<= 2 s on 2 cores).

Every photo is degraded with a fixed seed, restored with one fixed sampling seed at the base's
defaults (what ``pfstorer restore`` does), and input and output are both scored by
``pfstorer evaluate`` against the original; each level's grid (input | restored | truth) is kept.

    python benchmarks/bench_base.py                               # compact, both suites, ~25 min
    python benchmarks/bench_base.py --suites faces1024 --limit 24 # a quick look at photo size
    python benchmarks/bench_base.py --base OUT --steps 4 --t-start 300
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pfstorer.gates import LEVELS, PHOTO_LEVELS, base_gates, photo_gates  # noqa: E402  (torch-free)
from _common import command_line, device_name, lfw_people, markdown_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
LFW = DATA / "lfw128"
FACES1024 = DATA / "faces1024"
METRICS = {"lfw128": ("psnr", "ssim", "st_lpips", "id_facenet", "sharpness"),
           "faces1024": ("psnr", "ssim", "st_lpips", "niqe", "id_facenet", "id_dlib", "sharpness")}
SCALED = {"id_facenet": 100.0, "id_dlib": 100.0}
GRID_ROWS = {"lfw128": 8, "faces1024": 3}  # photos per comparison grid (input | restored | truth)


def bench_photos(people: int, per_person: int) -> list[tuple[str, Path]]:
    """(name, path) of the held-out photos: photos 6, 7, ... of the first bench people that have them."""
    chosen = [(n, ph) for n, ph in lfw_people(LFW).items() if len(ph) >= 5 + per_person][:people]
    if len(chosen) < people:
        raise SystemExit(f"only {len(chosen)} bench people have {5 + per_person} photos")
    return [(f"{n}_{k}", ph[5 + k]) for n, ph in chosen for k in range(per_person)]


def tune_photos(data: Path) -> list[dict[str, str]]:
    """The index rows of the train people that ``train-base --holdout 48`` kept out of training:
    settings are chosen on these, never on the bench."""
    from pipelines.base_data import probe_holdout

    with open(data / "index.csv", newline="") as fh:
        train = [r for r in csv.DictReader(fh) if r["split"] == "train"]
    return [train[i] for i in probe_holdout([r["identity"] for r in train], 48)]


def photo_bench(split: str = "bench", limit: int | None = None) -> list[tuple[str, Path]]:
    """(name, path) of faces1024 photos in index order: the ``bench`` split, or ``tune``."""
    if split == "tune":
        rows = tune_photos(FACES1024)
    else:
        with open(FACES1024 / "index.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["split"] == "bench"]
    return [(Path(r["path"]).stem + "_" + r["set"], FACES1024 / r["path"]) for r in rows][:limit]


@dataclass
class Case:
    """One restore: what goes in (uint8, at ``scale``), the row shown as its input, and the truth."""

    name: str
    lq: Any
    shown: Any
    scale: float = 1.0


def _means(report, metrics) -> dict[str, float]:
    return {m: float(report.means[m]) * SCALED.get(m, 1.0) for m in metrics if report.means.get(m) is not None}


def _cases(level: str, gts: dict[str, Any], seed0: int) -> list[Case]:
    import torch

    from pfstorer.degradations import degrade
    from pfstorer.images import resize
    from pfstorer.sampling import upscale

    def u8(x):
        return x.mul(255).round().to(torch.uint8)

    out = []
    for i, (name, gt) in enumerate(gts.items()):
        if level == "clean":
            out.append(Case(name, u8(gt), u8(gt)))
        elif level == "x4":
            small = u8(degrade(resize(gt, (gt.shape[1] // 4, gt.shape[2] // 4)), "light", seed0 + i))
            out.append(Case(name, small, upscale(small[None], 4)[0], scale=4))
        else:
            lq = u8(degrade(gt, level, seed0 + i))
            out.append(Case(name, lq, lq))
    return out


def run_suite(suite: str, model, sampling, gts: dict[str, Any], levels, work: Path, threads: int, seed: int,
              gates, tiles: dict[str, int]) -> tuple[list[dict], dict[str, Any], list[float]]:
    """Restore and score every level of one suite: table rows, per-level payload, compute seconds."""
    from pfstorer.evaluate import evaluate_folders
    from pfstorer.images import save_image
    from pfstorer.sampling import restore_batch

    metrics = METRICS[suite]
    gt_dir = work / suite / "original"
    for name, gt in gts.items():
        save_image(gt, gt_dir / f"{name}.png")
    rows, payload, compute_s = [], {}, []
    for level in levels:
        in_dir, out_dir = work / suite / level / "input", work / suite / level / "restored"
        for case in _cases(level, gts, {"lfw128": 1000, "faces1024": 2000}[suite] + (500 if level == "x4" else 0)):
            t0 = time.process_time()
            out = restore_batch(model, case.lq[None], seeds=[seed], scale=case.scale, steps=sampling.steps,
                                sampler=sampling.sampler, t_start=sampling.t_start, **tiles)[0]
            compute_s.append((time.process_time() - t0) / threads)
            save_image(case.shown, in_dir / f"{case.name}.png")
            save_image(out, out_dir / f"{case.name}.png")
        inp = _means(evaluate_folders(in_dir, gt_dir, work / suite / level / "eval_input", metrics=metrics,
                                      grid_rows=0), metrics)
        res = _means(evaluate_folders(out_dir, gt_dir, work / suite / level / "eval_restored", metrics=metrics,
                                      input_dir=in_dir, grid_rows=GRID_ROWS[suite]), metrics)
        checks = gates(level, inp, res)
        payload[level] = {"input": inp, "restored": res, "gates": dict(checks)}
        for which, vals in (("input" if level != "x4" else "bicubic", inp), ("restored", res)):
            rows.append({"suite": suite, "level": level, "image": which,
                         **{m: round(vals.get(m, float("nan")), 4) for m in metrics},
                         "gates": "" if which != "restored" else
                         ", ".join(f"{g}: {'pass' if ok else 'FAIL'}" for g, ok in checks)})
        print(markdown_table(rows[-2:]), file=sys.stderr)
    return rows, payload, compute_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="compact", help="preset or checkpoint folder (default compact)")
    ap.add_argument("--suites", nargs="+", default=["lfw128", "faces1024"], choices=["lfw128", "faces1024"])
    ap.add_argument("--people", type=int, default=20, help="lfw128: bench people")
    ap.add_argument("--per-person", type=int, default=2, help="lfw128: held-out photos per person")
    ap.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS, help="lfw128 levels")
    ap.add_argument("--photo-levels", nargs="+", default=list(PHOTO_LEVELS), choices=PHOTO_LEVELS,
                    help="faces1024 levels")
    ap.add_argument("--size", type=int, default=512, help="faces1024: long side of the photos in pixels")
    ap.add_argument("--limit", type=int, help="faces1024: only the first N photos")
    ap.add_argument("--split", choices=["bench", "tune"], default="bench",
                    help="bench: the bench people (what is reported); tune: the train people held out of "
                         "base training, on which settings are chosen (default bench)")
    ap.add_argument("--steps", type=int, help="override the base's default steps")
    ap.add_argument("--t-start", type=int, help="override the base's default start timestep")
    ap.add_argument("--sampler", choices=["ddim", "ddpm"], help="override the base's default sampler")
    ap.add_argument("--tile", type=int, help="override the tile size in output pixels (default: the base's native size)")
    ap.add_argument("--overlap", type=int, help="override the tile overlap in output pixels (default: the base's)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (degradation seeds are fixed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="keep the images and evaluate's tables here")
    ap.add_argument("--grids", type=Path, help="copy each level's comparison grid here")
    ap.add_argument("--name", help="results file stem (default base_<base>_cpu)")
    args = ap.parse_args(argv)

    import torch

    from pfstorer.images import load_image, resize
    from pfstorer.model import load_base
    from pfstorer.sampling import tile_layout

    torch.set_num_threads(args.threads)
    model = load_base(args.base)
    sampling = model.config.sampling.override(sampler=args.sampler, steps=args.steps, t_start=args.t_start)
    print(f"bench_base: {model.config.name} ({model.fingerprint[:12]}), {sampling.sampler} {sampling.steps} "
          f"steps from t={sampling.t_start}", file=sys.stderr)
    tiles = dict(zip(("tile", "overlap"), tile_layout(model.config, args.tile, args.overlap)))
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_base_"))
    rows, payload, compute = [], {}, {}
    if "lfw128" in args.suites:
        if args.split == "tune":
            photos = [(Path(r["path"]).stem, LFW / r["path"]) for r in tune_photos(LFW)][:args.people * args.per_person]
        else:
            photos = bench_photos(args.people, args.per_person)
        gts = {name: load_image(path) for name, path in photos}
        r, p, c = run_suite("lfw128", model, sampling, gts, args.levels, work, args.threads, args.seed, base_gates,
                           tiles)
        rows += r
        payload["lfw128"] = {"photos": len(gts), "split": args.split, "levels": p}
        compute["median_compute_s_per_128px_face"] = sorted(c)[len(c) // 2]
    if "faces1024" in args.suites:
        gts = {}
        for name, path in photo_bench(args.split, args.limit):
            img = load_image(path)
            k = args.size / max(img.shape[1:])
            gts[name] = resize(img, (round(img.shape[1] * k), round(img.shape[2] * k)))
        r, p, c = run_suite("faces1024", model, sampling, gts, args.photo_levels, work, args.threads, args.seed,
                            photo_gates, tiles)
        rows += r
        payload["faces1024"] = {"photos": len(gts), "split": args.split, "size": args.size, "levels": p}
        compute[f"median_compute_s_per_{args.size}px_photo"] = sorted(c)[len(c) // 2]
    passed = all(ok for suite in payload.values() for lv in suite["levels"].values() for ok in lv["gates"].values())
    photo_s = compute.get(f"median_compute_s_per_{args.size}px_photo")
    if photo_s is not None:
        passed = passed and photo_s <= 2.0
    if args.grids:
        args.grids.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        for grid in work.glob("*/*/eval_restored/grid.png"):  # JPEG: photos at 512 px are large as PNG
            Image.open(grid).convert("RGB").save(args.grids / f"{grid.parts[-4]}_{grid.parts[-3]}.jpg", quality=90)
    table = markdown_table(rows)
    table += (f"\n\nID = cosine x 100 (FaceNet; dlib); ST-LPIPS is shift-tolerant LPIPS; sharpness = Laplacian "
              f"variance of the truth's face box, restored over truth (1: as sharp as the truth). Degradation "
              f"seeds fixed, sampling seed {args.seed}; {sampling.sampler}, {sampling.steps} step(s) from "
              f"t = {sampling.t_start}; {tiles['tile']} px tiles overlapping by {tiles['overlap']} px; colour fix "
              f"{sampling.color_fix}. "
              f"Median compute (CPU time / threads): "
              + ", ".join(f"{k.removeprefix('median_compute_s_per_')}: {v:.3f} s" for k, v in compute.items())
              + f". All gates: {'pass' if passed else 'FAIL'}.")
    print(table)
    out = {
        "device": device_name("cpu"), "command": command_line(), "base": model.config.name,
        "fingerprint": model.fingerprint, "sampling": sampling.model_dump(), **tiles, "suites": payload,
        **compute, "all_gates_pass": passed, "threads": args.threads, "cpus": os.cpu_count(),
    }
    stem = args.name or f"base_{Path(args.base).name}_cpu"
    js, md = write_results(stem, out, table)
    print(f"wrote {js} and {md}; images under {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
