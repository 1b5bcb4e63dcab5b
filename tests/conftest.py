"""Shared test set-up: offline, private, loopback-only; paths to the shared face photos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pfstorer.settings import use_offline_env  # noqa: E402

use_offline_env()
for _k, _v in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    # Ray workers, Serve replicas and the test process share 2 cores: more threads each only spin.
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Fixtures of the real services, shared by name (pytest finds them here).
from _ray import ray_session  # noqa: E402,F401
from _services import (  # noqa: E402,F401
    mlflow_local,
    mlflow_pg_server,
    mlflow_server,
    s3_bucket,
    s3_endpoint_url,
    s3_storage_options,
    s3_url,
)
from _validate_cases import case  # noqa: E402,F401

INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration/ starts real services or processes: mark it so
    ``-m "not integration"`` and ``make test-fast`` (tests/unit/ alone) select the same tests."""
    for item in items:
        if INTEGRATION in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (present on our machines and CI)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lfw_bench(shared_data: Path) -> dict[str, list[Path]]:
    """lfw128 bench people -> their photos sorted by file name (first 5 are the references)."""
    import csv

    people: dict[str, list[Path]] = {}
    with open(shared_data / "lfw128" / "index.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["split"] == "bench":
                people.setdefault(row["identity"], []).append(shared_data / "lfw128" / row["path"])
    return {k: sorted(v) for k, v in sorted(people.items())}
