"""The shared adapter layer without services: keys, store and index on local files."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from pfstorer.errors import AdapterError, PFStorerError
from registry import AdapterIndex, AdapterRegistry, ArtifactStore, IndexEntry
from registry.keys import check_key, is_safe_key, job_key, model_key, model_name, parse_model_key

from _registry_cases import BASE, FlakyStore, make_adapter, write_concurrently


def test_keys_and_names():
    for ok in ("AJ_Cook", "a", "x.y-z_1", "A" * 128):
        assert is_safe_key(ok)
    for bad in ("../x", "a/b", "", ".hidden", "a..b", "a b", "A" * 129, None, 3, "é"):
        assert not is_safe_key(bad)
    assert is_safe_key("acme-1", "tenant") and not is_safe_key("a.b", "tenant")
    with pytest.raises(PFStorerError, match="not a safe key"):
        check_key("../x")
    assert model_name("acme", "A.B") == "pfstorer.acme.A.B"
    assert model_key("acme", "bob") == "acme/bob"
    assert parse_model_key("acme/bob") == ("acme", "bob")
    for bad in ("", "acme", "acme/../x", "a.b/c"):
        with pytest.raises(PFStorerError):
            parse_model_key(bad)


def test_job_key_is_stable_and_sensitive():
    k = job_key(["b" * 64, "a" * 64], BASE, {"steps": 5, "lr": 1e-3})
    assert len(k) == 32 and int(k, 16) >= 0
    assert k == job_key(["a" * 64, "b" * 64], BASE, {"lr": 1e-3, "steps": 5})  # order-free
    assert k != job_key(["a" * 64], BASE, {"steps": 5, "lr": 1e-3})
    assert k != job_key(["a" * 64, "b" * 64], BASE + "x", {"steps": 5, "lr": 1e-3})
    assert k != job_key(["a" * 64, "b" * 64], BASE, {"steps": 6, "lr": 1e-3})




def test_store_put_verify_fetch(tmp_path: Path):
    store = ArtifactStore(tmp_path / "store")
    src = make_adapter(tmp_path / "src", "acme", "bob")
    uri, sha = store.put_adapter(src, "acme", "bob", "k1")
    assert sha == hashlib.sha256((src / "adapter.safetensors").read_bytes()).hexdigest()
    assert uri == (tmp_path / "store" / "acme" / "bob" / "k1").as_uri()
    assert store.exists("acme", "bob", "k1") and not store.exists("acme", "bob", "k2")
    assert [Path(u).name for u in store.list_files("acme", "bob")] == [
        "adapter.json",
        "adapter.safetensors",
    ]  # no temporary files left
    got = store.fetch_adapter(uri, tmp_path / "cache" / "x", sha)
    assert (got / "adapter.safetensors").read_bytes() == (src / "adapter.safetensors").read_bytes()
    # a wrong expectation fails and leaves nothing
    with pytest.raises(AdapterError, match="fails verification"):
        store.fetch_adapter(uri, tmp_path / "cache" / "y", "0" * 64)
    assert not (tmp_path / "cache" / "y").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["x"]
    # a locally corrupt adapter, and a transport that corrupts, both refuse to store
    with pytest.raises(AdapterError, match="corrupt"):
        store.put_adapter(make_adapter(tmp_path / "src", "acme", "eve", corrupt=True), "acme", "eve", "k1")
    flaky = FlakyStore(tmp_path / "store")
    with pytest.raises(AdapterError, match="upload of adapter.safetensors .* is corrupt"):
        flaky.put_adapter(make_adapter(tmp_path / "src", "acme", "ann"), "acme", "ann", "k1")
    assert store.list_files("acme", "ann") == [] and store.list_files("acme", "eve") == []
    with pytest.raises(PFStorerError):
        store.put_adapter(src, "acme", "../x", "k1")
    assert store.delete_identity("acme", "bob") == 2
    assert store.list_files("acme") == [] and not store.exists("acme", "bob")


def test_a_killed_uploaders_leftovers_are_swept_by_the_next_upload(tmp_path: Path):
    store = ArtifactStore(tmp_path / "store")
    person = tmp_path / "store" / "acme" / "bob"
    dead, live = person / ".tmp-k0-dead", person / ".tmp-k1-live"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "adapter.safetensors").write_bytes(b"half an upload")
    old = time.time() - ArtifactStore.STALE_UPLOAD_S - 60
    os.utime(dead / "adapter.safetensors", (old, old))
    store.put_adapter(make_adapter(tmp_path / "src", "acme", "bob"), "acme", "bob", "k2")
    assert sorted(p.name for p in person.iterdir()) == [".tmp-k1-live", "k2"]  # a live upload is kept
    assert store.sweep_uploads("acme", "bob", older_than_s=0) == 1 and sorted(p.name for p in person.iterdir()) == ["k2"]
    assert store.sweep_uploads("acme", "nobody") == 0


def test_index_upsert_visible_to_second_instance(tmp_path: Path):
    url = tmp_path / "state" / "index.parquet"
    writer, reader = AdapterIndex(url), AdapterIndex(url)
    assert reader.get("acme", "bob") is None and reader.list() == []
    e1 = IndexEntry("acme", "bob", 1, "file:///x/1", "a" * 64, BASE, "k1")
    writer.upsert([e1, IndexEntry("other", "bob", 3, "file:///y", "b" * 64)])
    got = reader.get("acme", "bob")
    assert (got.version, got.uri, got.sha256, got.job_key) == (1, "file:///x/1", "a" * 64, "k1")
    assert got.updated_at is not None and got.label == "acme/bob@1"
    assert [e.key for e in reader.list("acme")] == ["acme/bob"]
    writer.upsert([IndexEntry("acme", "bob", 2, "file:///x/2", "c" * 64, BASE, "k2")])
    assert reader.get("acme", "bob").version == 2  # the reader re-reads the changed file
    assert reader.remove("other", "bob") and not reader.remove("other", "bob")
    assert writer.get("other", "bob") is None
    assert len(writer) == 1
    # a reader that checks at most every 60 s keeps its cached view meanwhile
    lazy = AdapterIndex(url, max_age_s=60)
    assert lazy.get("acme", "bob").version == 2
    writer.upsert([IndexEntry("acme", "bob", 3, "file:///x/3", "d" * 64)])
    assert lazy.get("acme", "bob").version == 2 and lazy.refresh(force=True)
    assert lazy.get("acme", "bob").version == 3


def test_index_check_is_what_readiness_asks(tmp_path: Path):
    """A missing or unreadable index fails the check; a readable one passes, empty or not."""
    url = tmp_path / "index.parquet"
    index = AdapterIndex(url)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        index.check()
    AdapterIndex(url).upsert([IndexEntry("acme", "bob", 1, "file:///x", "a" * 64)])
    index.check()
    (url / "_index.json").write_bytes(b"{\0" * 64)  # a damaged index
    with pytest.raises(Exception, match="(?i)unreadable"):
        index.check()
    with pytest.raises(Exception, match="(?i)unreadable"):
        index.check()  # still broken: the check says so every time, it does not flap
    with pytest.raises(Exception, match="(?i)unreadable"):
        index.get("acme", "bob")  # and lookups fail rather than answer "nobody"
    shutil.rmtree(url)
    with pytest.raises(FileNotFoundError):
        index.check()
    AdapterIndex(url).upsert([IndexEntry("acme", "ann", 1, "file:///z", "b" * 64)])
    index.check()
    assert [e.identity for e in index.list()] == ["ann"]


def test_index_lookups_never_wait_for_a_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """While the background thread reads a changed bucket, lookups answer from what they have."""
    url = tmp_path / "index.parquet"
    writer, reader = AdapterIndex(url), AdapterIndex(url, max_age_s=0.05)
    writer.upsert([IndexEntry("acme", "bob", 1, "file:///x/1", "a" * 64)])
    assert reader.get("acme", "bob").version == 1
    writer.upsert([IndexEntry("acme", "bob", 2, "file:///x/2", "a" * 64)])
    parsing, release = threading.Event(), threading.Event()
    real_read = reader._read_file

    def slow_read(path: str):
        parsing.set()
        release.wait(10)
        return real_read(path)

    monkeypatch.setattr(reader, "_read_file", slow_read)
    time.sleep(0.1)  # the bucket is stale now
    t0 = time.monotonic()
    assert reader.get("acme", "bob").version == 1  # the old entry, at once; a reload is queued
    assert parsing.wait(10)
    assert reader.get("acme", "bob").version == 1  # still at once while the reload reads
    assert time.monotonic() - t0 < 1.0
    release.set()
    reader.wait_background()
    assert reader.get("acme", "bob").version == 2  # swapped in once read


def test_index_concurrent_writers_lose_nothing(tmp_path: Path):
    url = tmp_path / "index.parquet"
    a, b = AdapterIndex(url), AdapterIndex(url)

    write_concurrently((a, b), 15, "file:///")
    assert len(AdapterIndex(url).list("acme")) == 30
    assert not list(url.rglob(".tmp-*"))


def test_read_adapter_in_memory(tmp_path: Path):
    store = ArtifactStore(tmp_path / "store")
    src = make_adapter(tmp_path / "src", "acme", "bob")
    uri, sha = store.put_adapter(src, "acme", "bob", "k1")
    data, meta = store.read_adapter(uri, sha)
    assert data == (src / "adapter.safetensors").read_bytes() and meta["identity"] == "bob"
    with pytest.raises(AdapterError, match="fails verification"):
        store.read_adapter(uri, "0" * 64)
    stored = tmp_path / "store" / "acme" / "bob" / "k1" / "adapter.safetensors"
    stored.write_bytes(stored.read_bytes()[:-1] + b"!")  # bit rot in the store
    with pytest.raises(AdapterError, match="fails verification"):
        store.read_adapter(uri, sha)
    with pytest.raises(AdapterError, match="fails verification"):
        store.fetch_adapter(uri, tmp_path / "dest", sha)
    assert not (tmp_path / "dest").exists()


def test_serving_path_never_imports_mlflow(tmp_path: Path):
    """A read-only registry (no tracking URI) resolves and reads without importing MLflow."""
    import subprocess
    import sys

    store = ArtifactStore(tmp_path / "store")
    uri, sha = store.put_adapter(make_adapter(tmp_path / "src", "acme", "bob"), "acme", "bob", "k1")
    AdapterIndex(tmp_path / "index.parquet").upsert([IndexEntry("acme", "bob", 1, uri, sha)])
    code = (
        "import sys\n"
        "from registry import AdapterRegistry\n"
        f"reg = AdapterRegistry.from_urls({str(tmp_path / 'store')!r}, None, "
        f"{str(tmp_path / 'index.parquet')!r})\n"
        "entry = reg.resolve('acme', 'bob')\n"
        "data, meta = reg.read(entry)\n"
        "assert meta['identity'] == 'bob', meta\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'\n"
        "print('ok', entry.label, flush=True)\n"
        # skip interpreter teardown: pyarrow's thread pool sometimes aborts it ("terminate called
        # without an active exception", ~1 run in 6), which says nothing about MLflow imports
        "import os; os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok acme/bob@1"


def test_from_settings_reads_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for var in ("PFSTORER_STORE_URL", "PFSTORER_TRACKING_URI", "PFSTORER_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PFSTORER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PFSTORER_INDEX_URL", str(tmp_path / "elsewhere" / "index.parquet"))
    monkeypatch.setenv("PFSTORER_S3_ENDPOINT_URL", "http://127.0.0.1:1")
    reg = AdapterRegistry.from_settings()
    from registry import default_storage_options

    assert default_storage_options("s3://bucket/index.parquet") == {"endpoint_url": "http://127.0.0.1:1"}
    assert default_storage_options(str(tmp_path / "index.parquet")) == {}
    assert reg.store.url == str(tmp_path / "state" / "adapters")
    assert reg.index.url == str(tmp_path / "elsewhere" / "index.parquet")
    assert reg.models.tracking_uri == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"
    assert reg.models.artifact_location == (tmp_path / "state" / "mlartifacts").as_uri()
    assert not (tmp_path / "state").exists()  # nothing is created before it is used


def test_local_defaults_layout(tmp_path: Path):
    from registry import local_defaults

    urls = local_defaults(tmp_path / "state")
    assert urls["tracking_uri"] == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"
    assert urls["store_url"] == str(tmp_path / "state" / "adapters")
    assert urls["index_url"] == str(tmp_path / "state" / "index.parquet")
    serving = AdapterRegistry.from_urls(urls["store_url"], None, urls["index_url"])
    assert serving.resolve("acme", "bob") is None and serving.resolve("acme", "../x") is None
    with pytest.raises(PFStorerError, match="without an MLflow"):
        serving.forget("acme", "bob")


def test_a_job_record_fits_one_mlflow_tag_whatever_its_loss_curve():
    """A job run holds each person's job as one tag (MLflow keeps up to 8,000 characters): a
    short curve goes in whole, a long one thinned by a power of two with its last step kept."""
    import json

    from registry import JobSummary
    from registry.models import _TAG_LIMIT

    short = json.loads(JobSummary("ann", "k1", {"attempts": 1}, {"final_loss": 0.25}, [0.5, 0.25]).record())
    assert short == {"identity": "ann", "job_key": "k1", "params": {"attempts": 1},
                     "metrics": {"final_loss": 0.25}, "loss_curve": [0.5, 0.25]}
    curve = [1.0 / (i + 1) for i in range(3001)]
    text = JobSummary("bob", "k2", {}, {}, curve).record()
    record = json.loads(text)
    assert len(text) <= _TAG_LIMIT
    steps = record["loss_steps"]
    assert steps[0] == 0 and steps[-1] == 3000 and len(set(steps)) == len(steps) > 50
    assert record["loss_curve"] == [curve[i] for i in steps]
    stride = steps[1] - steps[0]
    assert stride & (stride - 1) == 0 and all(b - a == stride for a, b in zip(steps[:-2], steps[1:-1]))
