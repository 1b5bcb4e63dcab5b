"""Manifest schema, Parquet round trips (local, partitioned), hashing, from-folders."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pfstorer.errors import PFStorerError
from pipelines.manifest import (
    MANIFEST_SCHEMA,
    ManifestError,
    ManifestRow,
    manifest_from_folders,
    manifest_hash,
    read_manifest,
    write_manifest,
)

from _manifest_cases import ROWS, rows_with_extra


def test_schema_matches_pydantic_model():
    assert MANIFEST_SCHEMA.names[:4] == ["tenant", "identity", "role", "uri"]
    for name in MANIFEST_SCHEMA.names:
        assert name in ManifestRow.model_fields
    row = ManifestRow(tenant="acme", identity="a.b-c_1", role="ref", uri="x.jpg")
    assert row.credit is None
    for bad in (
        {"role": "train"},
        {"identity": "../x"},
        {"identity": ""},
        {"tenant": "a.b"},  # tenants have no dots: registered model names stay unambiguous
        {"uri": ""},
    ):
        with pytest.raises(ValueError):
            ManifestRow(**{**row.model_dump(), **bad})


def test_round_trip_local_keeps_extra_columns(tmp_path: Path):
    url = write_manifest(rows_with_extra(), tmp_path / "sub" / "m.parquet")
    table = read_manifest(url)
    assert table.num_rows == 3
    assert table.column_names[:7] == MANIFEST_SCHEMA.names
    assert table.column("camera").to_pylist() == ["cam0", "cam1", "cam2"]
    assert table.column("iso").to_pylist() == [0, 100, 200]
    assert table.column("tenant").to_pylist() == ["acme", "acme", "001"]
    assert table.column("credit").to_pylist() == ["me", None, None]
    # file:// URLs and ManifestRow objects work the same
    url2 = write_manifest([ManifestRow(**r) for r in ROWS], (tmp_path / "m2.parquet").as_uri())
    assert read_manifest(url2).select(["tenant", "identity", "role", "uri"]).to_pylist() == [
        {k: r[k] for k in ("tenant", "identity", "role", "uri")} for r in ROWS
    ]


def test_bad_rows_are_written_as_given(tmp_path: Path):
    """Writing does not validate: validation must see (and quarantine) bad rows."""
    rows = [{"tenant": "acme", "identity": "../x", "role": "train", "uri": None}]
    table = read_manifest(write_manifest(rows, tmp_path / "m.parquet"))
    assert table.to_pylist()[0]["identity"] == "../x"
    assert table.to_pylist()[0]["uri"] is None


def test_partitioned_dataset_read(tmp_path: Path):
    table = pa.Table.from_pylist(rows_with_extra())
    ds.write_dataset(
        table, tmp_path / "ds", format="parquet", partitioning=["tenant"], partitioning_flavor="hive"
    )
    (tmp_path / "ds" / "_SUCCESS").write_text("")  # marker files are ignored
    got = read_manifest(tmp_path / "ds")
    assert got.num_rows == 3
    # partition values stay strings ("001" is not the number 1)
    assert sorted(got.column("tenant").to_pylist()) == ["001", "acme", "acme"]
    assert got.schema.field("tenant").type == pa.string()
    assert manifest_hash(got) == manifest_hash(table)
    # write_manifest can partition too
    write_manifest(table, tmp_path / "ds2", partition_by=["tenant"])
    assert (tmp_path / "ds2" / "tenant=001").is_dir()
    assert manifest_hash(read_manifest(tmp_path / "ds2")) == manifest_hash(table)


def test_missing_required_column_is_a_clear_error(tmp_path: Path):
    pq.write_table(pa.table({"tenant": ["a"], "identity": ["b"], "path": ["x.jpg"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"lacks required column\(s\) role, uri") as err:
        read_manifest(tmp_path / "m.parquet")
    assert isinstance(err.value, PFStorerError)


def test_unreadable_manifest_errors(tmp_path: Path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "nope.parquet")
    (tmp_path / "text.parquet").write_text("not parquet at all")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(tmp_path / "text.parquet")
    pq.write_table(
        pa.table({"tenant": [1], "identity": [[1, 2]], "role": ["ref"], "uri": ["u"]}),
        tmp_path / "types.parquet",
    )
    with pytest.raises(ManifestError, match="column identity is not text"):
        read_manifest(tmp_path / "types.parquet")


def test_manifest_hash_order_independent_and_content_sensitive():
    table = pa.Table.from_pylist(rows_with_extra())
    h = manifest_hash(table)
    assert len(h) == 64
    order = list(range(table.num_rows))
    for seed in range(3):
        random.Random(seed).shuffle(order)
        shuffled = table.take(pa.array(order))
        cols = list(reversed(shuffled.column_names))
        assert manifest_hash(shuffled.select(cols)) == h
    rows = table.to_pylist()
    changed = [dict(r) for r in rows]
    changed[2]["uri"] = "s3://b/bob/2.jpg"
    assert manifest_hash(pa.Table.from_pylist(changed)) != h
    moved = [dict(r) for r in rows]  # same multiset of values, moved across rows
    moved[0]["uri"], moved[1]["uri"] = moved[1]["uri"], moved[0]["uri"]
    assert manifest_hash(pa.Table.from_pylist(moved)) != h
    assert manifest_hash(table.drop_columns(["iso"])) != h
    # null == absent: an all-null column, or a stored table's empty optional columns, change nothing
    assert manifest_hash(table.append_column("licence", pa.nulls(3, pa.string()))) == h
    assert manifest_hash(pa.concat_tables([table, table.slice(0, 1)])) != h  # a duplicated row
    assert manifest_hash(table.slice(0, 0)) != manifest_hash(table)


def _photo(path: Path, size: int = 80) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (size % 255, 10, 20)).save(path)


def test_manifest_from_folders(tmp_path: Path):
    root = tmp_path / "people"
    for name in ("a3.jpg", "a1.jpg", "a2.PNG", "a4.webp"):
        _photo(root / "ann" / name)
    for name in ("b1.jpg", "b2.jpg"):
        _photo(root / "bob" / name)
    (root / "ann" / "notes.txt").write_text("not a photo")
    _photo(root / "ann" / ".hidden.jpg")
    _photo(root / ".cache" / "x.jpg")
    (root / "loose.jpg").write_text("files at the top level are no person")

    table = manifest_from_folders(root, "acme")
    assert table.schema.equals(MANIFEST_SCHEMA)
    rows = table.to_pylist()
    assert [(r["identity"], Path(r["uri"]).name, r["role"]) for r in rows] == [
        ("ann", "a1.jpg", "ref"),
        ("ann", "a2.PNG", "ref"),
        ("ann", "a3.jpg", "ref"),
        ("ann", "a4.webp", "ref"),
        ("bob", "b1.jpg", "ref"),
        ("bob", "b2.jpg", "ref"),
    ]
    assert all(r["tenant"] == "acme" and Path(r["uri"]).is_absolute() for r in rows)

    held = manifest_from_folders(root, "acme", holdout=1).to_pylist()
    assert [r["role"] for r in held] == ["ref", "ref", "ref", "restore", "ref", "restore"]
    first = manifest_from_folders(root, "acme", refs=3).to_pylist()
    assert [r["role"] for r in first] == ["ref", "ref", "ref", "restore", "ref", "ref"]
    with pytest.raises(ValueError):
        manifest_from_folders(root, "acme", holdout=1, refs=2)
    with pytest.raises(ManifestError):
        manifest_from_folders(tmp_path / "missing", "acme")


def test_cli_from_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from pipelines.cli import main

    for person in ("ann", "bob"):
        for i in range(4):
            _photo(tmp_path / "in" / person / f"{i}.jpg")
    out = tmp_path / "m.parquet"
    rc = main(["manifest", "from-folders", str(tmp_path / "in"), "--tenant", "acme", "--out", str(out), "--holdout", "1"])
    assert rc == 0
    assert "8 photos of 2 people (6 references, 2 to restore)" in capsys.readouterr().out
    assert read_manifest(out).column("role").to_pylist().count("restore") == 2
    assert main(["manifest", "from-folders", str(tmp_path / "nope"), "--tenant", "acme", "--out", str(out)]) == 2
