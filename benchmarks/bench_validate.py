"""Manifests at scale: validation and batch restore on Ray Data, first run and reruns.

A synthetic manifest of ``--rows`` rows (10 photos per person: 5 references, 5 to restore, plus
a few bad rows of every kind) over photo files made from the lfw128 photos by re-encoding each
with its own quality and one marked pixel (every file has its own bytes). The files live outside
the repository (``--work``, made once and reused). Then, each phase in its own driver process
(so that its peak memory is its own):

- ``validate``: ``pfstorer manifest validate``'s path (:func:`pipelines.validate.validate_on_ray`)
  with a fresh probe cache (first run), the same manifest again (nothing changed: a listing of
  the photos' folders), and again after 1 % of the photos were re-encoded (those are read again
  and nothing else). On local files, and on S3 with ``--s3-rows`` rows (default: the same
  manifest; 0: skip S3): a moto server in its own process (not competing with this one for the
  GIL), the photos uploaded once per run by ``--upload-threads`` threads.
- ``restore``: ``pfstorer restore-batch``'s path (:func:`pipelines.batch_restore.restore_manifest`)
  on ``--restore-rows`` photos with the ``tiny`` base (``--restore-steps`` denoising steps) and
  ``--people`` adapters (rows of other people are error rows: no adapter), then again (every
  row finished: skipped); ``--restore-rows 0`` skips it.

Gates (local files): the unchanged rerun takes at most 10 s and 15 % of the first run; the 1 %
changed rerun at most twice the unchanged one; every run quarantines the same rows for the same
reasons.

    python benchmarks/bench_validate.py                       # the recorded run (100k rows)
    python benchmarks/bench_validate.py --restore-rows 0      # validation only, local and S3 at 100k
    python benchmarks/bench_validate.py --rows 2000 --restore-rows 0 --no-save   # a quick look

``--note`` adds a line to the results (e.g. what else ran on the machine).

Writes ``benchmarks/results/validate_cpu.json`` and ``.md`` (``validate_rerun_cpu`` when the
restore phase is skipped; nothing with ``--no-save``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
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


def rss_mib(field: str = "VmHWM") -> float:
    """This process's peak (``VmHWM``) or present (``VmRSS``) resident memory. Not ``ru_maxrss``:
    a child started by fork and exec inherits its parent's peak there."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(f"{field}:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib() -> float:
    return rss_mib("VmHWM")


def init_ray(cpus: int) -> None:
    from pfstorer.ray_env import prepare_ray

    prepare_ray(local=True)
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)


def phase_validate(args: argparse.Namespace) -> dict:
    import hashlib

    from pipelines.validate import validate_on_ray
    from registry import url_to_fs

    opts = json.loads(args.storage_options) if args.storage_options else None
    init_ray(args.cpus)
    cache = args.cache or str(Path(args.work) / "probe-cache.parquet")
    fs, path = url_to_fs(cache, opts)
    if args.fresh and fs.exists(path):
        fs.rm(path)
    start_mib = rss_mib("VmRSS")
    t0 = time.perf_counter()
    result = validate_on_ray(args.manifest, storage_options=opts, cache_url=cache, threads=args.threads)
    elapsed = time.perf_counter() - t0
    s = result.summary()
    bad = sorted(zip(*(result.quarantine.column(c).to_pylist() for c in ("identity", "uri", "stage", "reason"))))
    return {
        "rows": result.manifest.num_rows, "elapsed_s": elapsed, "rows_per_s": result.manifest.num_rows / elapsed,
        "photos_read": s["photos_read"], "photos_cached": s["photos_cached"],
        "people_ready": s["people_ready"], "quarantined_rows": s["quarantined_rows"],
        "quarantined_by_reason": s["quarantined_by_reason"], "driver_start_rss_mib": start_mib,
        "driver_peak_rss_mib": peak_rss_mib(),
        "quarantine_digest": hashlib.sha256(json.dumps(bad).encode()).hexdigest()[:16],
    }


def change_photos(manifest: str, opts: dict | None, every: int = 100, threads: int = 8) -> int:
    """Re-encode every ``every``-th good photo of the manifest with a new marked pixel (new bytes,
    size and version), ``threads`` at a time; the number of photos changed."""
    import io
    import random
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from pipelines.manifest import read_manifest
    from registry import url_to_fs

    uris = sorted({u for u in read_manifest(manifest, opts).column("uri").to_pylist() if "/bad/" not in u})[::every]
    mark = tuple(random.randrange(256) for _ in range(3))

    def change(uri: str) -> None:
        fs, path = url_to_fs(uri, opts)
        im = Image.open(io.BytesIO(fs.cat_file(path))).convert("RGB")
        im.putpixel((1, 1), mark)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        fs.pipe_file(path, buf.getvalue())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(change, uris))
    return len(uris)


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """A moto S3 server in its own process on a free port of 127.0.0.1; yields its URL."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"moto server exited ({proc.returncode}); see {log}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_copy(work: Path, manifest: Path, endpoint: str, threads: int) -> tuple[str, dict]:
    """The manifest and its photos uploaded (``threads`` at a time) to a fresh bucket on the moto
    server at ``endpoint``; ``(manifest url, storage options)``."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines.manifest import write_manifest

    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"}}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket="bench")
    files = [p for p in (work / "photos").rglob("*") if p.is_file()]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:  # a boto3 client is thread-safe
        list(pool.map(lambda p: client.put_object(Bucket="bench", Key=f"photos/{p.relative_to(work / 'photos')}",
                                                  Body=p.read_bytes()), files))
    print(f"  {len(files)} photos uploaded to moto S3 ({time.perf_counter() - t0:.0f} s)", flush=True)
    table = pq.read_table(manifest)
    uri = pc.replace_substring(table.column("uri"), str(work / "photos"), "s3://bench/photos")
    table = table.set_column(table.column_names.index("uri"), "uri", uri)
    return write_manifest(table, "s3://bench/manifest.parquet", opts), opts


def validate_runs(args: argparse.Namespace, storage: str, manifest: str, opts: dict | None, cache: str) -> dict:
    """First run, unchanged rerun, 1 % changed rerun of one manifest, each its own driver."""
    extra = {"cache": cache, "manifest": manifest, **({"storage_options": json.dumps(opts)} if opts else {})}
    runs = {"first": run_phase("validate", args, fresh="", **extra)}
    print(f"validate ({storage}), first run:", runs["first"], flush=True)
    runs["unchanged"] = run_phase("validate", args, **extra)
    print(f"validate ({storage}), unchanged rerun:", runs["unchanged"], flush=True)
    changed = change_photos(manifest, opts)
    runs["changed_1pct"] = {**run_phase("validate", args, **extra), "photos_changed": changed}
    print(f"validate ({storage}), 1 % changed rerun:", runs["changed_1pct"], flush=True)
    return runs


def gates(runs: dict) -> dict[str, bool]:
    """The gates of the module docstring over one storage's runs."""
    first, same, changed = runs["first"], runs["unchanged"], runs["changed_1pct"]
    return {
        "unchanged rerun <= 10 s": same["elapsed_s"] <= 10,
        "unchanged rerun <= 15% of first": same["elapsed_s"] <= 0.15 * first["elapsed_s"],
        "1% changed <= 2x unchanged": changed["elapsed_s"] <= 2 * same["elapsed_s"],
        "only changed photos read": same["photos_read"] == 0 and changed["photos_read"] == changed["photos_changed"],
        "same quarantine every run": len({r["quarantine_digest"] for r in runs.values()}) == 1,
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
    from pfstorer.restore_options import RestoreOptions
    from pipelines.batch_restore import restore_manifest

    manifest, index = Path(args.restore_manifest), Path(args.restore_index)
    init_ray(args.cpus)
    t0 = time.perf_counter()
    report = restore_manifest(
        str(manifest), str(Path(args.work) / f"restore-{args.restore_rows}" / "out"), index_url=str(index),
        base="tiny", device="cpu", options=RestoreOptions(steps=args.restore_steps), workers=args.cpus, cpus_per_worker=1, batch_size=8,
    )
    elapsed = time.perf_counter() - t0
    return {
        "rows": report.ok + report.errors + report.skipped, "elapsed_s": elapsed,
        "rows_per_s": (report.ok + report.errors + report.skipped) / elapsed,
        "restored_ok": report.ok, "errors": report.errors, "skipped": report.skipped,
        "driver_peak_rss_mib": peak_rss_mib(),
    }


def run_phase(phase: str, args: argparse.Namespace, **extra: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--work", args.work, "--cpus", str(args.cpus),
           "--threads", str(args.threads), "--restore-rows", str(args.restore_rows),
           "--restore-steps", str(args.restore_steps)]
    extra.setdefault("manifest", str(args.manifest))
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", v] if v != "" else [f"--{k.replace('_', '-')}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def restore_phases(args: argparse.Namespace) -> dict:
    """``restore-batch`` on ``--restore-rows`` photos, first run and rerun."""
    restore_manifest_path, index = make_adapters(args)
    out = Path(args.work) / f"restore-{args.restore_rows}" / "out"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    extra = {"restore_manifest": str(restore_manifest_path), "restore_index": str(index)}
    phases = {"restore_first": run_phase("restore", args, **extra)}
    print("restore-batch, first run:", phases["restore_first"], flush=True)
    phases["restore_rerun"] = run_phase("restore", args, **extra)
    print("restore-batch, rerun:", phases["restore_rerun"], flush=True)
    return phases


def s3_runs(args: argparse.Namespace, work: Path) -> dict:
    """:func:`validate_runs` on a moto S3 copy of a ``--s3-rows`` manifest."""
    s3_work = work if args.s3_rows == args.rows else work / f"s3-{args.s3_rows}"
    s3_work.mkdir(parents=True, exist_ok=True)
    local = make_photos(s3_work, args.s3_rows)
    with moto_server(s3_work / "moto.log") as endpoint:
        url, opts = s3_copy(s3_work, local, endpoint, args.upload_threads)
        return validate_runs(args, "moto S3", url, opts, "s3://bench/state/probe-cache.parquet")


def validate_table(results: dict[str, dict]) -> list[dict]:
    return [
        {
            "storage": storage,
            "run": run.replace("_1pct", " (1 %)"),
            "rows": p["rows"],
            "seconds": round(p["elapsed_s"], 1),
            "rows/s": round(p["rows_per_s"]),
            "x first run": round(p["elapsed_s"] / runs["first"]["elapsed_s"], 3),
            "photos read": p["photos_read"],
            "cached": p["photos_cached"],
            "quarantined": p["quarantined_rows"],
            "driver MiB at start": round(p["driver_start_rss_mib"]),
            "driver peak MiB": round(p["driver_peak_rss_mib"]),
        }
        for storage, runs in results.items()
        for run, p in runs.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000, help="manifest rows (10 photos per person)")
    ap.add_argument("--s3-rows", type=int, default=None, help="rows of the moto S3 runs (default --rows; 0: none)")
    ap.add_argument("--restore-rows", type=int, default=1000, help="photos restored by restore-batch (0: none)")
    ap.add_argument("--people", type=int, default=200, help="adapters for the restore phase (5 photos each)")
    ap.add_argument("--restore-steps", type=int, default=2, help="denoising steps per restore (tiny's default: 50)")
    ap.add_argument("--work", default="/tmp/pfstorer-bench-validate", help="photos and state (outside the repo)")
    ap.add_argument("--cpus", type=int, default=2, help="Ray CPUs (probe tasks, restore actors)")
    ap.add_argument("--threads", type=int, default=8, help="photos read at a time per probe task")
    ap.add_argument("--upload-threads", type=int, default=16, help="threads uploading the photos to moto S3")
    ap.add_argument("--note", default="", help="a line added to the results (e.g. what else ran on the machine)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--phase", choices=["validate", "restore"], help=argparse.SUPPRESS)
    ap.add_argument("--manifest", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--storage-options", help=argparse.SUPPRESS)
    ap.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--restore-manifest", help=argparse.SUPPRESS)
    ap.add_argument("--restore-index", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        result = phase_validate(args) if args.phase == "validate" else phase_restore(args)
        print(json.dumps(result, default=str))
        return

    args.s3_rows = args.rows if args.s3_rows is None else args.s3_rows
    load_at_start = os.getloadavg()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    args.manifest = make_photos(work, args.rows)
    print(f"manifest {args.manifest} ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    results = {"local files": validate_runs(args, "local files", str(args.manifest), None,
                                            str(work / "probe-cache.parquet"))}
    if args.s3_rows:
        results["moto S3"] = s3_runs(args, work)
    md = _common.markdown_table(validate_table(results))
    checks = {storage: gates(runs) for storage, runs in results.items()}
    md += "\n\nGates (local files): " + ", ".join(
        f"{k}: {'met' if v else '**not met**'}" for k, v in checks["local files"].items())
    reasons = results["local files"]["first"]["quarantined_by_reason"]
    md += "\n\nQuarantined rows by reason (every run): " + ", ".join(f"{k}: {v}" for k, v in reasons.items())
    phases = restore_phases(args) if args.restore_rows else {}
    if phases:
        md += "\n\n" + _common.markdown_table([
            {"phase": name.replace("_", ", "), "rows": p["rows"], "seconds": round(p["elapsed_s"], 1),
             "rows/s": round(p["rows_per_s"], 1), "photos restored": p["restored_ok"] + p["errors"],
             "skipped": p["skipped"], "driver peak MiB": round(p["driver_peak_rss_mib"])}
            for name, p in phases.items()
        ])
        md += (f"\n\nRestore phase: `tiny` base, {args.restore_steps} denoising steps, "
               f"{args.people} adapters, {args.cpus} Ray Data actors of 1 CPU, batches of 8.")
    if args.note:
        md += f"\n\nNote: {args.note}"
    print(md)
    payload = {
        "note": args.note, "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
        "device": f"CPU {_common.cpu_model()} x{os.cpu_count()} cores, no GPU",
        "command": _common.command_line(),
        "rows": args.rows, "s3_rows": args.s3_rows, "restore_rows": args.restore_rows, "ray_cpus": args.cpus,
        "validate": results, "gates": checks, "phases": phases,
    }
    if not args.no_save:
        js, mdp = _common.write_results("validate_cpu" if phases else "validate_rerun_cpu", payload, md)
        print(f"-> {js} / {mdp.name}")


if __name__ == "__main__":
    main()
