"""pfstorer.settings: defaults, derived paths, env, config files, precedence, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pfstorer.settings import CONFIG_ENV, Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No PFSTORER_* from the caller's environment; cwd is a fresh folder."""
    for key in list(os.environ):
        if key.startswith("PFSTORER_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_are_local_and_embedded(tmp_path: Path) -> None:
    s = Settings.load()
    state = tmp_path / ".pfstorer-state"
    assert s.state_dir == state and s.state_dir.is_absolute()
    assert s.base == "compact" and s.device == "auto" and s.base_weights is None
    assert s.store_url == str(state / "adapters")
    assert s.index_url == str(state / "index.parquet")
    assert s.tracking_uri == f"sqlite:///{state}/mlflow.db"
    assert s.tracking_uri.startswith("sqlite:////")  # absolute SQLite path
    assert s.registry_uri is None and s.ray_address is None and s.storage_options == {}
    assert s.workers >= 1 and s.gpus_per_worker == 0 and s.max_retries >= 0
    p = s.personalize
    assert (p.steps, p.batch_size, p.lambda_gen) == (150, 8, 0.1)
    assert (p.min_refs, p.max_refs) == (3, 20)
    assert s.serve.host == "127.0.0.1" and s.serve.port == 8000
    assert s.serve.autoscaling is None and s.serve.max_queued_requests >= 1
    assert s.limits.min_image_side > 0
    assert Settings() == s  # plain construction reads the same sources


def test_derived_paths_follow_state_dir(tmp_path: Path) -> None:
    s = Settings.load(state_dir=tmp_path / "elsewhere")
    assert s.store_url == str(tmp_path / "elsewhere" / "adapters")
    assert s.index_url == str(tmp_path / "elsewhere" / "index.parquet")
    assert s.tracking_uri == f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    # relative state_dir: made absolute against the cwd, and so are the derived values
    rel = Settings.load(state_dir="rel/state")
    assert rel.state_dir == tmp_path / "rel" / "state"
    assert rel.tracking_uri == f"sqlite:///{tmp_path}/rel/state/mlflow.db"
    # an explicitly set derived value is kept
    kept = Settings.load(state_dir=tmp_path / "x", store_url="s3://b/adapters")
    assert kept.store_url == "s3://b/adapters" and kept.index_url.startswith(str(tmp_path / "x"))


def test_env_overrides_nested_and_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PFSTORER_STATE_DIR", str(tmp_path / "envstate"))
    monkeypatch.setenv("PFSTORER_BASE", "compact")
    monkeypatch.setenv("PFSTORER_DEVICE", "cpu")
    monkeypatch.setenv("PFSTORER_WORKERS", "4")
    monkeypatch.setenv("PFSTORER_GPUS_PER_WORKER", "1")
    monkeypatch.setenv("PFSTORER_SERVE__PORT", "9100")
    monkeypatch.setenv("PFSTORER_SERVE__AUTOSCALING__MAX_REPLICAS", "6")
    monkeypatch.setenv("PFSTORER_PERSONALIZE__STEPS", "7")
    monkeypatch.setenv("PFSTORER_LIMITS__MIN_IMAGE_SIDE", "32")
    monkeypatch.setenv("PFSTORER_LOCAL_DIR", "/tmp/x")  # infra/local's knob: not a field, ignored
    monkeypatch.setenv(
        "PFSTORER_STORAGE_OPTIONS", '{"endpoint_url": "http://127.0.0.1:5001", "key": "k"}'
    )
    s = Settings.load()
    assert s.base == "compact" and s.device == "cpu" and s.workers == 4 and s.gpus_per_worker == 1
    assert s.serve.port == 9100 and s.serve.host == "127.0.0.1"  # sibling keeps its default
    assert s.serve.autoscaling is not None and s.serve.autoscaling.max_replicas == 6
    assert s.serve.autoscaling.min_replicas == 1
    assert s.personalize.steps == 7 and s.personalize.batch_size == 8  # sibling keeps its default
    assert s.limits.min_image_side == 32
    assert s.storage_options == {"endpoint_url": "http://127.0.0.1:5001", "key": "k"}
    assert s.tracking_uri == f"sqlite:///{tmp_path}/envstate/mlflow.db"


YAML_CONFIG = """
base: compact
workers: 3
store_url: s3://bucket/adapters
storage_options: {endpoint_url: "http://127.0.0.1:5001"}
personalize: {steps: 50, lr: 0.001}
serve:
  host: 127.0.0.1
  port: 1111
  max_queued_requests: 5
  autoscaling: {min_replicas: 0, max_replicas: 3, target_ongoing_requests: 1}
"""

TOML_CONFIG = """
base = "compact"
workers = 3
store_url = "s3://bucket/adapters"

[storage_options]
endpoint_url = "http://127.0.0.1:5001"

[personalize]
steps = 50
lr = 0.001

[serve]
port = 1111
max_queued_requests = 5

[serve.autoscaling]
min_replicas = 0
max_replicas = 3
target_ongoing_requests = 1
"""


@pytest.mark.parametrize("name,text", [("cfg.yaml", YAML_CONFIG), ("cfg.toml", TOML_CONFIG)])
def test_config_file_yaml_and_toml(
    name: str, text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / name
    path.write_text(text)
    for s in (Settings.load(path), Settings.load(str(path))):
        assert s.base == "compact" and s.workers == 3 and s.store_url == "s3://bucket/adapters"
        assert s.storage_options == {"endpoint_url": "http://127.0.0.1:5001"}
        assert s.personalize.steps == 50 and s.personalize.lr == 0.001
        assert s.personalize.lambda_gen == 0.1  # unspecified keys keep defaults
        assert s.serve.port == 1111 and s.serve.max_queued_requests == 5
        assert s.serve.autoscaling is not None and s.serve.autoscaling.max_replicas == 3
        # index_url was not set: still derived from the (default) state_dir
        assert s.index_url == str(tmp_path / ".pfstorer-state" / "index.parquet")
    # the same file through PFSTORER_CONFIG, for Settings.load() and plain Settings()
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert Settings.load().serve.port == 1111
    assert Settings().workers == 3


def test_precedence_overrides_env_file_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(YAML_CONFIG)
    monkeypatch.setenv(CONFIG_ENV, str(path))
    monkeypatch.setenv("PFSTORER_WORKERS", "5")  # env beats file
    monkeypatch.setenv("PFSTORER_SERVE__PORT", "2222")  # env beats file, nested
    monkeypatch.setenv("PFSTORER_DEVICE", "cpu")

    s = Settings.load()
    assert s.workers == 5 and s.serve.port == 2222  # env > file
    assert s.base == "compact" and s.serve.max_queued_requests == 5  # file > defaults
    assert s.serve.max_ongoing_requests == 16  # defaults
    assert s.device == "cpu"

    o = Settings.load(workers=7, serve={"port": 3333}, base=None, ray_address=None)
    assert o.workers == 7 and o.serve.port == 3333  # overrides > env
    assert o.serve.max_queued_requests == 5  # nested sections merge across layers
    assert o.base == "compact"  # a None override falls through (CLI option not given)

    # an explicit path wins over PFSTORER_CONFIG
    other = tmp_path / "other.toml"
    other.write_text('base = "sd21"\n')
    assert Settings.load(other).base == "sd21"
    assert Settings.load().base == "compact"  # and does not stick to later loads


def test_invalid_values_give_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError) as e:
        Settings.load(device="gpu")
    assert "device" in str(e.value) and "'auto', 'cpu' or 'cuda'" in str(e.value)

    with pytest.raises(ValidationError) as e:
        Settings.load(workers=0)
    assert "workers" in str(e.value) and "greater than or equal to 1" in str(e.value)

    monkeypatch.setenv("PFSTORER_SERVE__PORT", "not-a-port")
    with pytest.raises(ValidationError) as e:
        Settings.load()
    assert "serve.port" in str(e.value)
    monkeypatch.delenv("PFSTORER_SERVE__PORT")

    with pytest.raises(ValidationError) as e:
        Settings.load(personalize={"min_refs": 10, "max_refs": 5})
    assert "min_refs" in str(e.value)

    with pytest.raises(ValidationError) as e:
        Settings.load(serve={"autoscaling": {"min_replicas": 4, "max_replicas": 2}})
    assert "min_replicas" in str(e.value)

    typo = tmp_path / "typo.yaml"
    typo.write_text("serve: {prot: 1}\n")
    with pytest.raises(ValidationError) as e:
        Settings.load(typo)
    assert "serve.prot" in str(e.value) and "Extra inputs are not permitted" in str(e.value)

    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        Settings.load(tmp_path / "missing.yaml")
    ini = tmp_path / "cfg.ini"
    ini.write_text("[x]\n")
    with pytest.raises(ValueError, match="yaml.*toml"):
        Settings.load(ini)


def test_dump_yaml_round_trips_and_masks_secrets(tmp_path: Path) -> None:
    s = Settings.load(
        storage_options={"endpoint_url": "http://127.0.0.1:5001", "key": "AK", "secret": "SK"},
        serve={"autoscaling": {"max_replicas": 2}},
    )
    text = s.dump_yaml()
    data = yaml.safe_load(text)
    assert data["storage_options"] == {
        "endpoint_url": "http://127.0.0.1:5001",
        "key": "***",
        "secret": "***",
    }
    assert "SK" not in text and data["serve"]["autoscaling"]["max_replicas"] == 2
    path = tmp_path / "dump.yaml"
    path.write_text(s.dump_yaml(redact=False))
    assert Settings.load(path) == s


def test_serve_deployment_options() -> None:
    fixed = Settings.load(serve={"num_replicas": 2, "num_gpus": 1}).serve.deployment_options()
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert fixed["max_queued_requests"] == 16 and fixed["max_ongoing_requests"] == 16
    auto = Settings.load(serve={"autoscaling": {"min_replicas": 0, "max_replicas": 5}})
    opts = auto.serve.deployment_options()
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {
        "min_replicas": 0,
        "max_replicas": 5,
        "target_ongoing_requests": 2.0,
        "upscale_delay_s": 30.0,
        "downscale_delay_s": 600.0,
    }
    serve_config = pytest.importorskip("ray.serve.config")
    serve_config.AutoscalingConfig(**opts["autoscaling_config"])  # Ray accepts it


def test_settings_module_imports_neither_ray_nor_mlflow() -> None:
    code = (
        "import sys, pfstorer.settings; "
        "bad = [m for m in ('ray', 'mlflow') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr + r.stdout


def test_every_pfstorer_variable_in_the_code_is_a_setting() -> None:
    """One source for every setting: a ``PFSTORER_*`` name in the code is a field of Settings
    (nested sections through ``__``), so a variable is never read behind Settings' back."""
    import re

    root = Path(__file__).resolve().parents[2]
    fields = {f.upper() for f in Settings.model_fields}
    nested = {
        f"{name.upper()}__{sub.upper()}"
        for name, info in Settings.model_fields.items()
        if isinstance(info.annotation, type) and hasattr(info.annotation, "model_fields")
        for sub in info.annotation.model_fields
    }
    names: dict[str, str] = {}
    for package in ("pfstorer", "pipelines", "registry", "serving", "demo"):
        for path in (root / package).rglob("*.py"):
            for m in re.finditer(r"PFSTORER_([A-Z0-9_]+)", path.read_text()):
                names.setdefault(m.group(1).rstrip("_"), str(path.relative_to(root)))
    assert names, "the scan found no PFSTORER_ variable at all"
    unknown = {n: where for n, where in names.items() if n not in fields | nested | {"CONFIG"}}
    assert not unknown, f"PFSTORER_* variables that are not settings: {unknown}"
