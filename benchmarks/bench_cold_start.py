"""Cold start of ``pfstorer restore``: seconds of a whole command on one 128 px photo, of which
nearly all is start-up (imports, settings, loading the base), not the restore itself.

    .venv/bin/python benchmarks/bench_cold_start.py --runs 5            # compact, lfw128 photo
    .venv/bin/python benchmarks/bench_cold_start.py --runs 2 --no-write  # a quick look

Each run is a fresh process of the installed ``pfstorer`` command (what a user types), timed
wall-clock from start to exit. Reported: min and median of ``--runs`` runs; one more run under
``python -X importtime`` that says where the import time goes (importtime slows imports down, so
read its shares, not its sum); and one process restoring ``--runs`` copies of the photo from a
folder, which pays the start-up once. The photo is the first lfw128 bench photo with the heavy
degradation (seed 0), or a smooth random 128 px image where ../shared/data is missing.

Times depend on what else runs: the load average before and after is recorded with the results.
Results: ``benchmarks/results/cold_start_<base>_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, cpu_model, lfw_people, markdown_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LFW = REPO.parent / "shared" / "data" / "lfw128"
PFSTORER = Path(sys.executable).with_name("pfstorer")


def make_photo(dest: Path) -> str:
    """The degraded 128 px photo every run restores; says where it came from."""
    from pfstorer.degradations import degrade
    from pfstorer.images import load_image, save_image

    if (LFW / "index.csv").exists():
        src = next(iter(lfw_people(LFW).values()))[0]
        save_image(degrade(load_image(src), "heavy", 0), dest)
        return f"{src.relative_to(REPO.parent)} degraded heavy, seed 0"
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    small.resize((128, 128), Image.BICUBIC).save(dest)
    return "smooth random 128 px image (seed 0): ../shared/data/lfw128 is missing"


def timed(cmd: list[str], env: dict[str, str], check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds, proc


def import_shares(stderr: str, top: int = 12) -> dict[str, float]:
    """Seconds spent importing each package's own modules (``-X importtime`` self times, grouped by
    top-level package): the ``top`` largest, the rest as ``other``, and the ``total``."""
    by_package: dict[str, float] = {}
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \| \s*(\S+)", line)
        if m:
            package = m.group(2).split(".")[0]
            by_package[package] = by_package.get(package, 0.0) + int(m.group(1)) / 1e6
    ranked = sorted(by_package.items(), key=lambda kv: -kv[1])
    shares = dict(ranked[:top])
    shares["other"] = sum(v for _, v in ranked[top:])
    shares["total"] = sum(by_package.values())
    return shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="cold runs timed (min and median reported)")
    ap.add_argument("--base", default="compact", help="base preset restored with (default: compact, the default base)")
    ap.add_argument("--name", default=None, help="results file stem (default: cold_start_<base>_cpu)")
    ap.add_argument("--no-write", action="store_true", help="print only; write no results files")
    args = ap.parse_args()

    from pfstorer.settings import use_offline_env

    use_offline_env()
    env = dict(os.environ)
    work = Path(tempfile.mkdtemp(prefix="pfstorer-cold-"))
    try:
        photo = work / "photo.png"
        source = make_photo(photo)
        restore = [str(PFSTORER), "restore", "--base", args.base, "--quiet", "--input", str(photo)]
        load_before = tuple(round(x, 2) for x in os.getloadavg())

        runs = [timed([*restore, "--out", str(work / f"cold{i}.png")], env)[0] for i in range(args.runs)]
        _, traced = timed([sys.executable, "-X", "importtime", *restore, "--out", str(work / "traced.png")], env)
        shares = import_shares(traced.stderr)

        folder = work / "many"
        folder.mkdir()
        for i in range(args.runs):
            shutil.copy(photo, folder / f"photo{i}.png")
        many = [*restore[:-2], "--input", str(folder), "--out", str(work / "many_out")]
        batch_s, proc = timed(many, env, check=False)
        batch_error = None
        if proc.returncode != 0:  # a pfstorer from before restore took folders: say so, keep the cold runs
            batch_s, batch_error = None, proc.stderr.strip().splitlines()[-1]
        load_after = tuple(round(x, 2) for x in os.getloadavg())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cold_min, cold_median = min(runs), statistics.median(runs)
    n = args.runs
    rows = [{"measure": f"cold `pfstorer restore`, 1 photo (min of {n})", "seconds": cold_min},
            {"measure": f"cold `pfstorer restore`, 1 photo (median of {n})", "seconds": cold_median},
            {"measure": f"one `pfstorer restore` of a folder of {n} photos", "seconds": batch_s or batch_error},
            {"measure": f"{n} photos, one process each (median x {n})", "seconds": cold_median * n}]
    share_rows = [{"package": k, "import s (own modules, under -X importtime)": v} for k, v in shares.items()]
    print(markdown_table(rows))
    print()
    print(markdown_table(share_rows))
    threads = env.get("OMP_NUM_THREADS", "unset")
    payload = {
        "device": f"CPU {cpu_model()} x{os.cpu_count()} cores (OMP_NUM_THREADS {threads})",
        "command": command_line(),
        "pfstorer_command": " ".join([PFSTORER.name, *restore[1:-1], "PHOTO.png", "--out", "OUT.png"]),
        "base": args.base,
        "photo": source,
        "runs_s": runs,
        "min_s": cold_min,
        "median_s": cold_median,
        "batch_of_runs_photos_s": batch_s,
        "batch_error": batch_error,
        "import_seconds_by_package_under_importtime": shares,
        "load_average_before_after": [load_before, load_after],
    }
    if args.no_write:
        return
    stem = args.name or f"cold_start_{args.base}_cpu"
    note = (f"Each run: `{payload['pfstorer_command']}` in a fresh process, wall-clock. Photo: {source}. "
            f"Load average (1, 5, 15 min) before {load_before}, after {load_after}: times on a busy machine "
            "are longer.")
    table = (f"{note}\n\n{markdown_table(rows)}\n\nWhere the import time goes (one more run under "
             f"`python -X importtime`, which slows imports: read the shares):\n\n{markdown_table(share_rows)}")
    for path in write_results(stem, payload, table):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
