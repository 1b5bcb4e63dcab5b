"""Manifests at scale: validation and batch restore on Ray Data, first run and rerun.

A synthetic manifest of ``--rows`` rows (10 photos per person: 5 references, 5 to restore, plus
a few bad rows of every kind) over photo files made from the lfw128 photos by re-encoding each
with its own quality and one marked pixel (every file has its own bytes). The files live outside
the repository (``--work``, made once and reused). Then, each phase in its own driver process
(so that its peak memory is its own):

- ``validate``: ``pfstorer manifest validate``'s path (:func:`pipelines.validate.validate_on_ray`)
  with a fresh probe cache, then the same manifest again (the rerun: a stat per photo).
- ``restore``: ``pfstorer restore-batch``'s path (:func:`pipelines.batch_restore.restore_manifest`)
  on ``--restore-rows`` photos with the ``tiny`` base (``--restore-steps`` denoising steps) and
  ``--people`` adapters (rows of other people are error rows: no adapter), then again (every
  row finished: skipped).

    python benchmarks/bench_validate.py                       # the recorded run (100k rows)
    python benchmarks/bench_validate.py --rows 2000 --restore-rows 100 --no-save   # a quick look

Writes ``benchmarks/results/validate_cpu.json`` and ``.md`` (unless ``--no-save``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import _common  # noqa: E402
from pfstorer.settings import use_offline_env  # noqa: E402

use_offline_env()
LFW = REPO.parent / "shared" / "data" / "lfw128"
PER_PERSON = 10  # 5 references + 5 to restore


def make_photos(work: Path, rows: int) -> Path:
    """The synthetic manifest at ``work/manifest.parquet`` (photos under ``work/photos``)."""
    import io

    from PIL import Image

    from pipelines.manifest import write_manifest

    manifest = work / "manifest.parquet"
    marker = work / f"made-{rows}.json"
    if marker.exists() and manifest.exists():
        return manifest
    sources = [p for v in _common.lfw_people(LFW, split="train").values() for p in v]
    people = rows // PER_PERSON
    table, t0 = [], time.perf_counter()
    decoded: dict[int, Image.Image] = {}
    for person in range(people):
        folder = work / "photos" / f"{person // 1000:03d}" / f"p{person:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(PER_PERSON):
            i = person * PER_PERSON + k
            src = i % len(sources)
            if src not in decoded:
                decoded[src] = Image.open(sources[src]).convert("RGB")
            im = decoded[src].copy()
            im.putpixel((0, 0), (i % 256, (i // 256) % 256, (i // 65536) % 256))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80 + i % 16)
            path = folder / f"{k:02d}.jpg"
            path.write_bytes(buf.getvalue())
            role = "ref" if k < 5 else "restore"
            table.append({"tenant": "bench", "identity": f"p{person:06d}", "role": role, "uri": str(path)})
        if person % 1000 == 999:
            print(f"  photos for {person + 1} of {people} people ({time.perf_counter() - t0:.0f} s)", flush=True)
    # bad rows: a missing file, text, a truncated photo, a bad role, a duplicate, per 1,000 rows
    bad = work / "photos" / "bad"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "text.jpg").write_text("not a photo\n")
    good = Path(table[0]["uri"]).read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    for j in range(max(1, rows // 1000)):
        ident = f"p{(j * 37) % people:06d}"
        table += [
            {"tenant": "bench", "identity": ident, "role": "ref", "uri": str(bad / f"missing-{j}.jpg")},
            {"tenant": "bench", "identity": ident, "role": "ref", "uri": str(bad / "text.jpg")},
            {"tenant": "bench", "identity": ident, "role": "ref", "uri": str(bad / "truncated.jpg")},
            {"tenant": "bench", "identity": ident, "role": "train", "uri": table[0]["uri"]},
        ]
    write_manifest(table, manifest)
    marker.write_text(json.dumps({"rows": len(table)}))
    decoded.clear()
    return manifest


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def init_ray(cpus: int) -> None:
    from pfstorer.ray_env import prepare_ray

    prepare_ray(local=True)
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)


def phase_validate(args: argparse.Namespace) -> dict:
    from pipelines.validate import validate_on_ray

    init_ray(args.cpus)
    cache = str(Path(args.work) / "probe-cache.parquet")
    if args.fresh and Path(cache).exists():
        Path(cache).unlink()
    t0 = time.perf_counter()
    result = validate_on_ray(args.manifest, cache_url=cache, threads=args.threads)
    elapsed = time.perf_counter() - t0
    s = result.summary()
    return {
        "rows": result.manifest.num_rows, "elapsed_s": elapsed, "rows_per_s": result.manifest.num_rows / elapsed,
        "photos_read": s["photos_read"], "photos_cached": s["photos_cached"],
        "people_ready": s["people_ready"], "quarantined_rows": s["quarantined_rows"],
        "quarantined_by_reason": s["quarantined_by_reason"], "driver_peak_rss_mib": peak_rss_mib(),
    }


def make_adapters(args: argparse.Namespace) -> tuple[Path, Path]:
    """``--people`` adapters (1 step each: their shapes are what matters here) and a restore
    manifest of ``--restore-rows`` photos over them."""
    import pyarrow.parquet as pq

    from pfstorer.images import load_image
    from pfstorer.model import load_base
    from pfstorer.training import PersonalizeConfig, personalize
    from pipelines.manifest import write_manifest
    from registry import AdapterRegistry

    work = Path(args.work) / f"restore-{args.restore_rows}"
    index = work / "index.parquet"
    manifest = work / "manifest.parquet"
    if index.exists() and manifest.exists():
        return manifest, index
    work.mkdir(parents=True, exist_ok=True)
    rows = pq.read_table(args.manifest).to_pylist()
    photos: dict[str, dict[str, list[str]]] = {}
    for r in rows:
        if r["role"] in ("ref", "restore") and "/bad/" not in r["uri"]:
            photos.setdefault(r["identity"], {}).setdefault(r["role"], []).append(r["uri"])
    people = sorted(photos)[: args.people]
    registry = AdapterRegistry.from_urls(str(work / "store"), f"sqlite:///{work / 'mlflow.db'}", str(index))
    model = load_base("tiny")
    for i, name in enumerate(people):
        refs = [load_image(p) for p in photos[name]["ref"]]
        adapter = personalize(model, refs, identity=name, tenant="bench", config=PersonalizeConfig(steps=1))
        registry.publish(adapter.save(work / "adapters" / name), "bench", name, job_key=f"bench-{i}")
    restore = [
        {"tenant": "bench", "identity": name, "role": "restore", "uri": uri}
        for name in sorted(photos)
        for uri in photos[name].get("restore", [])
    ]
    # rows of the adapters' people first, then others (no adapter: an error row each)
    restore.sort(key=lambda r: r["identity"] not in people)
    write_manifest(restore[: args.restore_rows], manifest)
    return manifest, index


def phase_restore(args: argparse.Namespace) -> dict:
    from pipelines.batch_restore import restore_manifest

    manifest, index = Path(args.restore_manifest), Path(args.restore_index)
    init_ray(args.cpus)
    t0 = time.perf_counter()
    report = restore_manifest(
        str(manifest), str(Path(args.work) / f"restore-{args.restore_rows}" / "out"), index_url=str(index),
        base="tiny", device="cpu", steps=args.restore_steps, workers=args.cpus, cpus_per_worker=1, batch_size=8,
    )
    elapsed = time.perf_counter() - t0
    return {
        "rows": report.ok + report.errors + report.skipped, "elapsed_s": elapsed,
        "rows_per_s": (report.ok + report.errors + report.skipped) / elapsed,
        "restored_ok": report.ok, "errors": report.errors, "skipped": report.skipped,
        "driver_peak_rss_mib": peak_rss_mib(),
    }


def run_phase(phase: str, args: argparse.Namespace, **extra: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--work", args.work, "--manifest", str(args.manifest),
           "--cpus", str(args.cpus), "--threads", str(args.threads), "--restore-rows", str(args.restore_rows),
           "--restore-steps", str(args.restore_steps)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", v] if v != "" else [f"--{k.replace('_', '-')}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000, help="manifest rows (10 photos per person)")
    ap.add_argument("--restore-rows", type=int, default=1000, help="photos restored by restore-batch")
    ap.add_argument("--people", type=int, default=200, help="adapters for the restore phase (5 photos each)")
    ap.add_argument("--restore-steps", type=int, default=2, help="denoising steps per restore (tiny's default: 50)")
    ap.add_argument("--work", default="/tmp/pfstorer-bench-validate", help="photos and state (outside the repo)")
    ap.add_argument("--cpus", type=int, default=2, help="Ray CPUs (probe actors, restore actors)")
    ap.add_argument("--threads", type=int, default=8, help="photos read at a time per probe actor")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--phase", choices=["validate", "restore"], help=argparse.SUPPRESS)
    ap.add_argument("--manifest", help=argparse.SUPPRESS)
    ap.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--restore-manifest", help=argparse.SUPPRESS)
    ap.add_argument("--restore-index", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        result = phase_validate(args) if args.phase == "validate" else phase_restore(args)
        print(json.dumps(result, default=str))
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    args.manifest = make_photos(work, args.rows)
    print(f"manifest {args.manifest} ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    phases = {}
    phases["validate_first"] = run_phase("validate", args, fresh="")
    print("validate, first run:", phases["validate_first"], flush=True)
    phases["validate_rerun"] = run_phase("validate", args)
    print("validate, rerun:", phases["validate_rerun"], flush=True)
    restore_manifest_path, index = make_adapters(args)
    out = work / f"restore-{args.restore_rows}" / "out"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    extra = {"restore_manifest": str(restore_manifest_path), "restore_index": str(index)}
    phases["restore_first"] = run_phase("restore", args, **extra)
    print("restore-batch, first run:", phases["restore_first"], flush=True)
    phases["restore_rerun"] = run_phase("restore", args, **extra)
    print("restore-batch, rerun:", phases["restore_rerun"], flush=True)

    table = [
        {
            "phase": name.replace("_", ", "),
            "rows": p["rows"],
            "seconds": round(p["elapsed_s"], 1),
            "rows/s": round(p["rows_per_s"], 1),
            "photos read": p.get("photos_read", p.get("restored_ok", 0) + p.get("errors", 0)),
            "cached / skipped": p.get("photos_cached", p.get("skipped", 0)),
            "driver peak MiB": round(p["driver_peak_rss_mib"]),
        }
        for name, p in phases.items()
    ]
    md = _common.markdown_table(table)
    print(md)
    reasons = phases["validate_first"]["quarantined_by_reason"]
    md += "\n\nQuarantined rows by reason (first run): " + ", ".join(f"{k}: {v}" for k, v in reasons.items())
    md += (f"\n\nRestore phase: `tiny` base, {args.restore_steps} denoising steps, "
           f"{args.people} adapters, {args.cpus} Ray Data actors of 1 CPU, batches of 8.")
    payload = {
        "device": f"CPU {_common.cpu_model()} x{os.cpu_count()} cores, no GPU",
        "command": _common.command_line(),
        "rows": args.rows, "restore_rows": args.restore_rows, "ray_cpus": args.cpus,
        "phases": phases,
    }
    if not args.no_save:
        js, mdp = _common.write_results("validate_cpu", payload, md)
        print(f"-> {js} / {mdp.name}")


if __name__ == "__main__":
    main()
