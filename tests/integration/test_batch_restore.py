"""``pfstorer restore-batch``: Ray Data restores a manifest's role=restore rows with each person's
adapter (resolved through the index), streaming PNGs and results Parquet files; bad rows get
status=error with the reason and never stop the batch; outputs equal the offline restore; a rerun
(also after a crash) restores only what is not finished."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from _services import unique_name
from _torch import torch_threads

STEPS = 2


SEED = 5


@pytest.mark.integration
def test_restore_batch_cli(ray_session, mlflow_local, lfw_bench, tmp_path: Path) -> None:
    from pfstorer.cli import main
    from pfstorer.images import encode_png, load_image
    from pfstorer.model import load_base
    from pfstorer.sampling import restore
    from pfstorer.training import PersonalizeConfig, personalize
    from pipelines.batch_restore import read_results
    from pipelines.manifest import write_manifest
    from registry import AdapterRegistry

    tenant = unique_name("acme")
    registry = AdapterRegistry.from_urls(
        str(tmp_path / "store"), mlflow_local.tracking_uri, str(tmp_path / "index.parquet"),
        artifact_location=mlflow_local.artifact_location,
    )
    people = [name for name, photos in lfw_bench.items() if len(photos) >= 7][:2]
    with torch_threads(1):
        model = load_base("tiny")
        adapters = {}
        for i, name in enumerate(people):
            refs = [load_image(p) for p in lfw_bench[name][:5]]
            adapters[name] = personalize(
                model, refs, identity=name, tenant=tenant, config=PersonalizeConfig(steps=2, lr=0.05)
            )
            registry.publish(adapters[name].save(tmp_path / "adapters" / name), tenant, name, job_key=f"j{i}")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(lfw_bench[people[0]][5].read_bytes()[:300])
    a, b = people
    rows = [
        {"tenant": tenant, "identity": a, "role": "ref", "uri": str(lfw_bench[a][0])},  # skipped
        {"tenant": tenant, "identity": a, "role": "restore", "uri": str(lfw_bench[a][5])},
        {"tenant": tenant, "identity": a, "role": "restore", "uri": str(lfw_bench[a][6])},
        {"tenant": tenant, "identity": b, "role": "restore", "uri": str(lfw_bench[b][5])},
        {"tenant": tenant, "identity": a, "role": "restore", "uri": str(corrupt)},  # bad photo
        {"tenant": tenant, "identity": "Nobody", "role": "restore", "uri": str(lfw_bench[b][6])},  # no adapter
    ]
    manifest = write_manifest(rows, str(tmp_path / "manifest.parquet"))
    out = tmp_path / "out"

    t0 = time.perf_counter()
    rc = main([
        "restore-batch", "--manifest", manifest, "--out", str(out), "--index", str(tmp_path / "index.parquet"),
        "--base", "tiny", "--steps", str(STEPS), "--seed", str(SEED), "--workers", "1",
        "--cpus-per-worker", "1", "--batch-size", "2",
    ])  # fmt: skip
    print(f"\n[batch] restore-batch took {time.perf_counter() - t0:.1f}s")
    assert rc == 0

    results = read_results(str(out)).to_pylist()
    assert sorted(r["uri"] for r in results) == sorted(r["uri"] for r in rows[1:])  # restore rows
    assert pq.read_table(out / "results").num_rows == 5  # Parquet files, as written
    by_uri = {r["uri"]: r for r in results}
    bad = by_uri[str(corrupt)]
    assert bad["status"] == "error" and "corrupt" in bad["error"] and bad["output_uri"] is None
    nobody = next(r for r in results if r["identity"] == "Nobody")
    assert nobody["status"] == "error" and "no adapter" in nobody["error"]
    good = [r for r in results if r["status"] == "ok"]
    assert len(good) == 3
    labels = {e.identity: e.label for e in registry.index.list(tenant)}
    for r in good:
        assert r["error"] is None and r["adapter"] == labels[r["identity"]] and r["seed"] == SEED
        assert Path(r["output_uri"]).is_file()
        with torch_threads(1):
            ref = restore(model, load_image(r["uri"]), adapter=adapters[r["identity"]], seed=SEED, steps=STEPS)
        assert Path(r["output_uri"]).read_bytes() == encode_png(ref), r["uri"]

    # a rerun into the same folder skips the finished rows and retries the failed ones
    assert main([
        "restore-batch", "--manifest", manifest, "--out", str(out), "--index", str(tmp_path / "index.parquet"),
        "--base", "tiny", "--steps", str(STEPS), "--seed", str(SEED), "--workers", "1", "--json",
    ]) == 0  # fmt: skip
    again = read_results(str(out))
    assert {r["uri"]: r["status"] for r in again.to_pylist()} == {r["uri"]: r["status"] for r in results}
    assert pq.read_table(out / "results").num_rows == 7  # 2 retried rows appended

    # a crash keeps what was written; the rerun restores only the rest
    crash_rows = [
        {"tenant": tenant, "identity": n, "role": "restore", "uri": str(p)}
        for n in people for p in lfw_bench[n][1:4]
    ]
    crash_manifest = write_manifest(crash_rows, str(tmp_path / "crash.parquet"))
    crash_out = tmp_path / "crash-out"
    cmd = [
        sys.executable, "-m", "pfstorer.cli", "restore-batch", "--manifest", crash_manifest,
        "--out", str(crash_out), "--index", str(tmp_path / "index.parquet"), "--base", "tiny",
        "--steps", "4", "--workers", "1", "--batch-size", "1", "--json",
        "--ray-address", ray_session.get_runtime_context().gcs_address,  # a killed driver, not a killed cluster
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while not read_results(str(crash_out)).num_rows:  # a whole file, not one still being written
            assert proc.poll() is None, "restore-batch ended before writing anything"
            assert time.monotonic() < deadline, "no results file within 240 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    kept = read_results(str(crash_out))
    assert 1 <= kept.num_rows < len(crash_rows)
    assert main(cmd[3:]) == 0  # the rerun, in this process: same arguments, the same cluster
    final = read_results(str(crash_out))
    assert sorted(final.column("uri").to_pylist()) == sorted(r["uri"] for r in crash_rows)
    assert set(final.column("status").to_pylist()) == {"ok"}
    assert _readable_rows(crash_out / "results") == len(crash_rows)  # nothing kept was redone


def _readable_rows(results: Path) -> int:
    """Rows in the whole results files: the kill may cut one short, and its rows are redone."""
    rows = 0
    for f in results.glob("*.parquet"):
        try:
            rows += pq.read_metadata(f).num_rows
        except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
            continue
    return rows
