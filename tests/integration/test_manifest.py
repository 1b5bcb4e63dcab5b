"""Manifest Parquet round trips on a real S3 API (moto server on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.manifest import (
    ManifestError,
    manifest_hash,
    read_manifest,
    write_manifest,
)

from _manifest_cases import rows_with_extra


@pytest.mark.integration
def test_round_trip_s3(s3_url: str, s3_storage_options: dict, tmp_path: Path):
    rows = rows_with_extra()
    url = write_manifest(rows, f"{s3_url}/m.parquet", s3_storage_options)
    table = read_manifest(url, s3_storage_options)
    assert table.num_rows == 3
    assert table.column("camera").to_pylist() == ["cam0", "cam1", "cam2"]
    assert table.column("notes").to_pylist() == [None, None, "x"]
    assert manifest_hash(table) == manifest_hash(read_manifest(write_manifest(rows, tmp_path / "m.parquet")))
    # a partitioned dataset on S3
    write_manifest(rows, f"{s3_url}/ds", s3_storage_options, partition_by=["tenant"])
    got = read_manifest(f"{s3_url}/ds", s3_storage_options)
    assert sorted(got.column("tenant").to_pylist()) == ["001", "acme", "acme"]
    assert manifest_hash(got) == manifest_hash(table)
    with pytest.raises(ManifestError):
        read_manifest(f"{s3_url}/missing.parquet", s3_storage_options)
