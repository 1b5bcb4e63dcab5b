"""The driver of base training: data into the object store, the Ray Train run, its outputs."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pipelines.base_data import Source, load_split, probe_holdout
from pipelines.train_base.config import RUN_FILE, TrainBaseConfig, TrainBaseResult
from pipelines.train_base.loop import train_loop
from pipelines.train_base.plots import plot_curve


def _device_name(use_gpu: bool) -> str:
    if use_gpu:
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        except Exception:
            pass
    return f"CPU ({os.cpu_count()} cores visible), no GPU"


def train_base(
    *,
    data: str | Sequence[Source],
    out: str | Path,
    config: TrainBaseConfig = TrainBaseConfig(),
    split: str = "train",
    limit: int | None = None,
    store: str | None = None,
    resume: bool = False,
    verbose: bool = True,
) -> TrainBaseResult:
    """Train (or ``resume``) a base model; writes the final weights and the loss curve to ``out``."""
    from pfstorer.ray_env import prepare_ray
    from pipelines.cluster import cluster_address

    prepare_ray(local=not cluster_address())
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pfstorer.errors import InputError
    from pfstorer.presets import get_preset

    get_preset(config.base)  # unknown preset: a clear error before anything starts
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / RUN_FILE
    if resume:
        if not run_file.exists():
            raise InputError(f"--resume: no earlier run recorded in {run_file}")
        prev = json.loads(run_file.read_text())
        store, run_name = prev["store"], prev["run_name"]
    else:
        store = store or str((out / "checkpoints").resolve())
        run_name = f"train-base-{config.base}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    if config.batch_size % config.workers:
        raise InputError(f"--batch-size {config.batch_size} must be a multiple of --workers {config.workers}")

    sources = [Source(data=data)] if isinstance(data, str) else [Source.model_validate(x) for x in data]
    if not sources:
        raise InputError("train-base needs at least one data source")
    run_file.write_text(json.dumps({"store": store, "run_name": run_name, "config": config.model_dump(mode="json"),
                                    "data": [x.model_dump() for x in sources], "split": split, "limit": limit},
                                   indent=2))
    if not ray.is_initialized():
        ray.init(address=cluster_address() or "local", include_dashboard=False,
                 configure_logging=False, log_to_driver=verbose)
    source_refs, probes, identities = [], [], []
    for src in sources:
        t0 = time.perf_counter()
        images, ids = load_split(src.data, split, limit=limit, seed=config.seed)
        if verbose:
            mib = sum(x.nbytes for x in images) / 2**20
            print(f"train-base: {len(images)} photos of {len(set(ids))} people from {src.data} split={split} "
                  f"decoded in {time.perf_counter() - t0:.1f}s ({mib:.0f} MiB)", file=sys.stderr)
        if config.holdout:
            held = probe_holdout(ids, config.holdout, config.seed)
            if held:
                keep = sorted(set(range(len(ids))) - set(held))
                probes.append((Path(src.data.rstrip("/")).name, ray.put([images[i] for i in held]), src.face_px))
                images, ids = [images[i] for i in keep], [ids[i] for i in keep]
                if verbose:
                    print(f"train-base: {len(held)} photos of their own people held out for the probe",
                          file=sys.stderr)
        source_refs.append((ray.put(images), src.model_dump()))
        identities += ids
        del images
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "sources": source_refs, "probes": probes},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=store,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("training reported no checkpoint")
    with ckpt.as_directory() as d:
        d = Path(d)
        state = json.loads((d / "state.json").read_text())
        exp = d / "export"
        if not exp.exists():  # resumed a run that had already finished: export its weights
            from pfstorer.model import load_base

            m = load_base(str(d))
            fp = m.fingerprint
            m.save(out)
        else:
            for name in ("config.json", "model.safetensors"):
                (out / name).write_bytes((exp / name).read_bytes())
            fp = result.metrics.get("fingerprint", "")
    curve = {
        "preset": config.base, "device": _device_name(config.use_gpu), "workers": config.workers,
        "data": [x.model_dump() for x in sources], "split": split, "photos": len(identities), "people": len(set(identities)),
        "steps": state["step"], "resumed_from": state["resumed_from"],
        "start_fingerprint": state.get("start_fingerprint"), "init_fingerprint": state.get("init_fingerprint"),
        "fingerprint": fp, "wall_s": state["wall_s"], "samples": state.get("samples"),
        "config": config.model_dump(mode="json"), "loss": state["losses"], "probes": state.get("probes", []),
        "adv_loss": state.get("adv_losses", []), "disc_loss": state.get("disc_losses", []),
        "detail_loss": state.get("detail_losses", []), "structure_loss": state.get("structure_losses", []),
    }
    (out / "loss_curve.json").write_text(json.dumps(curve))
    plot_curve(curve, out / "loss_curve.png")
    tail = state["losses"][-50:]
    return TrainBaseResult(
        out=str(out), store=store, run_name=run_name, steps=state["step"], resumed_from=state["resumed_from"],
        final_loss=float(sum(tail) / len(tail)) if tail else float("nan"), wall_s=state["wall_s"],
        samples_per_s=float(state.get("samples", 0)) / max(state["wall_s"], 1e-9),
        checkpoint=ckpt.path, fingerprint=fp,
    )
