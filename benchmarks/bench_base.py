"""Does the base model restore? Its quality gates on unseen faces, at the CLI's defaults.

The LFW bench people are never trained on (``pfstorer train-base`` refuses them). Each of the
first ``--people`` bench people with enough photos gives its held-out photos (the ones after the
5 personalization references, ``--per-person`` of them); every photo is degraded at each level
with a fixed seed, restored with one fixed sampling seed at the base's defaults (what
``pfstorer restore`` does), and input and output are both scored by ``pfstorer evaluate``
against the original. The ``clean`` level feeds the original itself (the paper's p_HQ case).

Gates: :func:`pfstorer.gates.base_gates` (ID is FaceNet cosine x 100).

Also measured: seconds of compute per 128 px face at the defaults (torch threads as given).

    python benchmarks/bench_base.py                      # compact, 20 people x 2 photos, ~5 min
    python benchmarks/bench_base.py --base OUT --steps 4 --t-start 300
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pfstorer.gates import LEVELS, base_gates  # noqa: E402  (torch-free)
from _common import command_line, device_name, lfw_people, markdown_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LFW = REPO.parent / "shared" / "data" / "lfw128"
METRICS = ("psnr", "ssim", "st_lpips", "id_facenet")


def bench_photos(people: int, per_person: int) -> list[tuple[str, Path]]:
    """(name, path) of the held-out photos: photos 6, 7, ... of the first bench people that have them."""
    chosen = [(n, ph) for n, ph in lfw_people(LFW).items() if len(ph) >= 5 + per_person][:people]
    if len(chosen) < people:
        raise SystemExit(f"only {len(chosen)} bench people have {5 + per_person} photos")
    return [(f"{n}_{k}", ph[5 + k]) for n, ph in chosen for k in range(per_person)]


def _means(report) -> dict[str, float]:
    scale = {"id_facenet": 100.0}
    return {m: float(report.means[m]) * scale.get(m, 1.0) for m in METRICS if report.means.get(m) is not None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="compact", help="preset or checkpoint folder (default compact)")
    ap.add_argument("--people", type=int, default=20)
    ap.add_argument("--per-person", type=int, default=2, help="held-out photos per person")
    ap.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    ap.add_argument("--steps", type=int, help="override the base's default steps")
    ap.add_argument("--t-start", type=int, help="override the base's default start timestep")
    ap.add_argument("--sampler", choices=["ddim", "ddpm"], help="override the base's default sampler")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (degradation seeds are fixed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="keep the images and evaluate's tables here")
    ap.add_argument("--name", help="results file stem (default base_<base>_cpu)")
    args = ap.parse_args(argv)

    import torch

    from pfstorer.degradations import degrade
    from pfstorer.evaluate import evaluate_folders
    from pfstorer.images import load_image, save_image
    from pfstorer.model import load_base
    from pfstorer.sampling import restore_batch

    torch.set_num_threads(args.threads)
    model = load_base(args.base)
    sampling = model.config.sampling.override(sampler=args.sampler, steps=args.steps, t_start=args.t_start)
    photos = bench_photos(args.people, args.per_person)
    print(f"bench_base: {model.config.name} ({model.fingerprint[:12]}), {len(photos)} photos, "
          f"{sampling.sampler} {sampling.steps} steps from t={sampling.t_start}", file=sys.stderr)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_base_"))
    gt_dir = work / "original"
    gts = {}
    for name, path in photos:
        gts[name] = load_image(path)
        save_image(gts[name], gt_dir / f"{name}.png")

    rows, payload_levels, compute_s = [], {}, []
    for level in args.levels:
        in_dir, out_dir = work / level / "input", work / level / "restored"
        for i, (name, _) in enumerate(photos):
            gt = gts[name]
            lq = gt if level == "clean" else degrade(gt, level, 1000 + i)
            u8 = lq.mul(255).round().to(torch.uint8)
            t0 = time.process_time()
            out = restore_batch(model, u8[None], seeds=[args.seed], steps=sampling.steps,
                                sampler=sampling.sampler, t_start=sampling.t_start)[0]
            compute_s.append((time.process_time() - t0) / args.threads)
            save_image(u8, in_dir / f"{name}.png")
            save_image(out, out_dir / f"{name}.png")
        inp = _means(evaluate_folders(in_dir, gt_dir, work / level / "eval_input", metrics=METRICS, grid_rows=0))
        out = _means(evaluate_folders(out_dir, gt_dir, work / level / "eval_restored", metrics=METRICS,
                                      input_dir=in_dir, grid_rows=8))
        checks = base_gates(level, inp, out)
        payload_levels[level] = {"input": inp, "restored": out, "gates": dict(checks)}
        for which, vals in (("input", inp), ("restored", out)):
            rows.append({"level": level, "image": which, **{m: round(vals.get(m, float("nan")), 4) for m in METRICS},
                         "gates": "" if which == "input" else
                         ", ".join(f"{g}: {'pass' if ok else 'FAIL'}" for g, ok in checks)})
        print(markdown_table(rows[-2:]), file=sys.stderr)

    # Compute per face: CPU time of the restores divided by the threads (wall on an idle machine).
    per_face = sorted(compute_s)[len(compute_s) // 2]
    passed = all(ok for lv in payload_levels.values() for ok in lv["gates"].values())
    table = markdown_table(rows)
    table += (f"\n\nID = FaceNet cosine x 100; ST-LPIPS is shift-tolerant LPIPS. {len(photos)} held-out photos of "
              f"{args.people} LFW bench people, degradation seeds 1000 + i, sampling seed {args.seed}; "
              f"{sampling.sampler}, {sampling.steps} step(s) from t = {sampling.t_start}. "
              f"Median compute per 128 px face: {per_face:.3f} s. All gates: {'pass' if passed else 'FAIL'}.")
    print(table)
    payload = {
        "device": device_name("cpu"), "command": command_line(), "base": model.config.name,
        "fingerprint": model.fingerprint, "sampling": sampling.model_dump(), "photos": len(photos),
        "people": args.people, "levels": payload_levels, "median_compute_s_per_128px_face": per_face,
        "all_gates_pass": passed, "threads": args.threads, "cpus": os.cpu_count(),
    }
    stem = args.name or f"base_{Path(args.base).name}_cpu"
    js, md = write_results(stem, payload, table)
    print(f"wrote {js} and {md}; images under {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
