"""``pfstorer run``: manifest -> validate -> Ray Train worker group -> registry.

One real Ray (``ray_session``), real MLflow (SQLite, and an ``mlflow server`` subprocess), moto's S3
server, the ``tiny`` base and 2 training steps. Killed workers and a lost job queue:
``test_run_faults.py``.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.manifest import write_manifest
from registry import AdapterRegistry

from _run_cases import STEPS, people_rows, settings_for, versions
from _services import unique_name


@pytest.fixture(scope="module")
def first_run(ray_session, lfw_bench, tmp_path_factory):
    from PIL import Image

    from pipelines.run import run_manifest

    root = tmp_path_factory.mktemp("run20")
    tenant = unique_name("acme")
    names = sorted(lfw_bench)[:20]
    rows = people_rows(lfw_bench, names, tenant)
    # bad rows, five kinds (+ a person with too few references)
    (root / "notes.jpg").write_text("not an image")
    Image.new("RGB", (32, 32), "gray").save(root / "tiny.png")
    spare = sorted(lfw_bench)[20:22]
    bad = {
        str(root / "missing.jpg"): ("read", {"identity": names[0]}),
        str(root / "notes.jpg"): ("image", {"identity": names[1]}),
        str(root / "tiny.png"): ("image", {"identity": names[2]}),
        "dup": ("dedup", {"identity": names[3]}),
        "unsafe": ("schema", {"identity": "../escape"}),
        "role": ("schema", {"identity": names[4], "role": "thumbnail"}),
    }
    for uri, (_, extra) in bad.items():
        real = {"dup": str(lfw_bench[names[3]][0]), "unsafe": str(lfw_bench[spare[0]][0]),
                "role": str(lfw_bench[names[4]][-1])}.get(uri, uri)
        rows.append({"tenant": tenant, "role": "ref", "uri": real, **extra})
    rows += people_rows(lfw_bench, [spare[1]], tenant, refs=2)  # too few references
    manifest = str(root / "manifest.parquet")
    write_manifest(rows, manifest)
    settings = settings_for(root / "state", workers=2, steps=STEPS)
    t0 = time.perf_counter()
    summary = run_manifest(manifest, settings, pack=4, steps=STEPS, report_interval_s=1.0)
    return {"summary": summary, "seconds": time.perf_counter() - t0, "names": names,
            "tenant": tenant, "manifest": manifest, "settings": settings, "spare": spare,
            "bad": bad, "rows": len(rows)}


@pytest.mark.integration
def test_run_trains_registers_and_quarantines(first_run):
    s, names, tenant = first_run["summary"], first_run["names"], first_run["tenant"]
    print(s.table())
    assert (s.people, s.done, s.skipped, s.failed) == (20, 20, 0, 0), s.table()
    assert s.trained == 20 and s.versions_created == 20 and s.rows == first_run["rows"]
    registry = AdapterRegistry.from_settings(first_run["settings"])
    assert versions(registry, tenant, names) == {n: [1] for n in names}
    for n in names:
        assert registry.models.newest(tenant, n).version == 1
    entries = registry.index.list(tenant)
    assert sorted(e.identity for e in entries) == names
    assert all(registry.store.exists(tenant, e.identity, e.job_key) for e in entries)
    # every job in the job run of its publishing batch, with its loss curve; the lineage on the version
    mv = registry.models.versions(tenant, names[0])[0]
    run = registry.models.client.get_run(mv.run_id)
    job = json.loads(run.data.tags[f"job.{names[0]}"])
    assert job["job_key"] == mv.tags["job_key"] and run.data.params["base"] == "tiny"
    assert len(job["loss_curve"]) == STEPS and job["params"]["references"] >= 3
    assert mv.tags["manifest_hash"] == s.manifest_hash and mv.tags["pipeline_run"] == s.run_id
    # every bad row in quarantine with its reason; the 2-reference person as a whole
    q = pq.read_table(s.quarantine_url).to_pylist()
    stages = {}
    for row in q:
        stages.setdefault(row["stage"], []).append(row)
        assert row["reason"]
    assert {"read", "image", "dedup", "schema", "refs"} <= set(stages)
    assert any("not found" in r["reason"] for r in stages["read"])
    assert any(r["identity"] == "../escape" for r in stages["schema"])
    assert any(r["role"] == "thumbnail" for r in stages["schema"])
    assert [r["identity"] for r in stages["refs"]] == [first_run["spare"][1]] * 2
    assert s.quarantined_rows == len(q) == 8
    assert first_run["spare"][1] not in {e.identity for e in entries}
    # Ray Train state: a final checkpoint with every worker's progress, metrics from rank 0
    assert s.ray_train["checkpoint"] and s.ray_train["metrics"]["done"] >= 0
    assert Path(s.ray_train["checkpoint"], "progress-rank0.json").is_file()
    assert Path(s.summary_path).is_file()
    assert all(o.train_s is not None and o.publish_s is not None for o in s.by_status("done"))


@pytest.mark.integration
def test_rerun_trains_and_registers_nothing(first_run):
    from pipelines.run import run_manifest

    registry = AdapterRegistry.from_settings(first_run["settings"])
    names = first_run["names"]
    # a crash between registration and the index write: the rerun repairs the index row
    assert registry.index.remove(first_run["tenant"], names[0])
    t0 = time.perf_counter()
    s = run_manifest(first_run["manifest"], first_run["settings"], pack=4, steps=STEPS)
    seconds = time.perf_counter() - t0
    print(s.table())
    assert (s.skipped, s.done, s.failed, s.trained, s.versions_created) == (20, 0, 0, 0, 0)
    assert s.index_repaired == 1
    assert s.ray_train == {}  # no worker group was started
    assert versions(registry, first_run["tenant"], names) == {n: [1] for n in names}
    assert len(registry.index.list(first_run["tenant"])) == 20
    assert seconds < first_run["seconds"] / 3, (seconds, first_run["seconds"])


@pytest.mark.integration
def test_run_on_s3_with_mlflow_server(
    ray_session, lfw_bench, tmp_path, s3_url, s3_storage_options, mlflow_server
):
    import fsspec

    from pipelines.run import run_manifest

    fs = fsspec.filesystem("s3", **s3_storage_options)
    tenant = unique_name("s3")
    names = sorted(lfw_bench)[40:44]
    rows = []
    for name in names:
        for p in lfw_bench[name][:3]:
            uri = f"{s3_url}/photos/{name}/{p.name}"
            fs.pipe_file(uri, p.read_bytes())
            rows.append({"tenant": tenant, "identity": name, "role": "ref", "uri": uri})
    rows.append({"tenant": tenant, "identity": names[0], "role": "ref",
                 "uri": f"{s3_url}/photos/nobody.jpg"})
    manifest = f"{s3_url}/manifest.parquet"
    write_manifest(rows, manifest, s3_storage_options)
    overrides = dict(
        store_url=f"{s3_url}/adapters", index_url=f"{s3_url}/index.parquet",
        tracking_uri=mlflow_server.tracking_uri, storage_options=s3_storage_options,
    )
    settings = settings_for(tmp_path / "state", workers=1, steps=STEPS, **overrides)
    s = run_manifest(manifest, settings, pack=4, quarantine_out=f"{s3_url}/quarantine.parquet")
    print(s.table())
    assert (s.done, s.failed, s.quarantined_rows) == (4, 0, 1), s.table()
    registry = AdapterRegistry.from_settings(settings)
    assert versions(registry, tenant, names) == {n: [1] for n in names}
    entries = registry.index.list(tenant)
    assert sorted(e.identity for e in entries) == names
    assert all(e.uri.startswith("s3://") for e in entries)
    data, meta = registry.read(entries[0])  # sha256-verified read back from S3
    assert meta["identity"] == entries[0].identity and len(data) > 1000
    q = pq.read_table(io.BytesIO(fs.cat_file(f"{s3_url}/quarantine.parquet"))).to_pylist()
    assert [r["stage"] for r in q] == ["read"]
    # the version names the job run that holds its job
    mv = registry.models.versions(tenant, names[0])[0]
    assert f"job.{names[0]}" in registry.models.client.get_run(mv.run_id).data.tags
    # and a rerun against S3 + server registers nothing
    again = run_manifest(manifest, settings, pack=4, quarantine_out=f"{s3_url}/q2.parquet")
    assert (again.skipped, again.trained) == (4, 0)
    assert versions(registry, tenant, names) == {n: [1] for n in names}
