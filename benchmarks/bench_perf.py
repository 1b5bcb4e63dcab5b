"""Fast-path benchmark: packed personalization, eager vs compiled restore, mixed-identity batches, swaps.

GPU (the numbers that matter):
    python benchmarks/bench_perf.py --base sd21 --device cuda --dtype bfloat16 --compile-mode reduce-overhead
    python benchmarks/bench_perf.py --base sd21 --device cuda --autocast-bf16 --gradient-checkpointing
CPU smoke (CI-sized):           python benchmarks/bench_perf.py --base tiny --device cpu --quick
Writes benchmarks/results/perf_<gpu|cpu>_<base>[_bf16][_ckpt].json + .md (naming the card and the
command); prints the table. Peak memory (``peak_gib``) is measured on CUDA only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, device_name, markdown_table, write_results  # noqa: E402

from pfstorer.adapter import Adapter  # noqa: E402
from pfstorer.config import TrainingSpeed  # noqa: E402
from pfstorer.model import load_base  # noqa: E402
from pfstorer.personalization import AdapterSlots  # noqa: E402
from pfstorer.sampling import restore_batch  # noqa: E402
from pfstorer.training import PackedTrainer, PersonalizeConfig, PersonalizeJob  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fake_refs(n: int, size: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((3, size, size), generator=g) for _ in range(n)]


def peak_gib(device: str) -> float | str:
    """Peak device memory since the last reset (CUDA only)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else ""


def bench_personalization(model, device: str, packs: list[int], steps: int, full_steps: int,
                          speed: TrainingSpeed, config: PersonalizeConfig = PersonalizeConfig()) -> list[dict]:
    rows = []
    size = model.config.sample_size
    label = "".join([", bf16 autocast" if speed.autocast_bf16 else "",
                     ", checkpointing" if speed.gradient_checkpointing else ""])
    for k in packs:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        trainer = PackedTrainer(model, config.model_copy(update={"steps": steps + 1}), capacity=k, speed=speed)
        for i in range(k):
            trainer.add(PersonalizeJob(f"p{i}", fake_refs(5, size, i), seed=i))
        trainer.step()  # warm-up (allocations, kernels)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            trainer._train_step(sorted(trainer.slots))
        sync(device)
        per_step = (time.perf_counter() - t0) / max(1, steps - 1)
        per_id = per_step * full_steps / k
        rows.append({"work": f"personalize packed K={k}{label}", "s_per_step": per_step,
                     f"s_per_identity_at_{full_steps}": per_id, "identities_per_hour": 3600 / per_id,
                     "peak_gib": peak_gib(device)})
    return rows


def bench_restore(model, device: str, steps: int, batches: list[int], compile_mode: str | None) -> list[dict]:
    rows = []
    size = model.config.sample_size
    adapters = AdapterSlots.for_model(model, slots=max(batches))
    for b in sorted(set([1, *batches])):
        imgs = torch.rand((b, 3, size, size), generator=torch.Generator().manual_seed(b))
        slots = [i % adapters.slots for i in range(b)]  # every row a different person
        kw = dict(adapters=adapters, slots=slots, seeds=list(range(b)), steps=steps, color_fix="none")
        restore_batch(model, imgs, **kw)
        sync(device)
        t0 = time.perf_counter()
        restore_batch(model, imgs, **kw)
        sync(device)
        dt = time.perf_counter() - t0
        rows.append({"work": f"restore {steps} steps, batch {b}, mixed people, eager", "s_per_call": dt,
                     "images_per_s": b / dt})
    if compile_mode is not None:
        model.compile_denoiser(mode=None if compile_mode == "default" else compile_mode)
        imgs = torch.rand((1, 3, size, size))
        kw = dict(adapters=adapters, slots=[0], seeds=[0], steps=steps, color_fix="none")
        t0 = time.perf_counter()
        restore_batch(model, imgs, **kw)
        compile_s = time.perf_counter() - t0
        restore_batch(model, imgs, **kw)
        sync(device)
        t0 = time.perf_counter()
        restore_batch(model, imgs, **kw)
        sync(device)
        dt = time.perf_counter() - t0
        rows.append({"work": f"restore {steps} steps, batch 1, compiled ({compile_mode})", "s_per_call": dt,
                     "images_per_s": 1 / dt, "first_call_s": compile_s})
    return rows


def bench_swap(model) -> list[dict]:
    trainer = PackedTrainer(model, PersonalizeConfig(steps=0), capacity=1)
    trainer.add(PersonalizeJob("swap", fake_refs(3, model.config.sample_size, 0), seed=0))
    adapter = trainer.step()[0]
    slots = AdapterSlots.for_model(model, slots=2)
    with tempfile.TemporaryDirectory() as d:
        adapter.save(d)
        t0 = time.perf_counter()
        loaded = Adapter.load(d)  # read + sha256 verify + safetensors parse
        slots.load(0, loaded.tensors)
        cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(10):
        slots.load(1, adapter.tensors)
    warm = (time.perf_counter() - t0) / 10
    mb = sum(t.numel() * t.element_size() for t in adapter.tensors.values()) / 2**20
    return [{"work": f"adapter swap cold (disk+verify), {mb:.1f} MiB", "s_per_call": cold},
            {"work": "adapter swap warm (host RAM -> slot, in place)", "s_per_call": warm}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true", help="CI-sized: small packs, few steps")
    p.add_argument("--packs", default="1,4,8,16", help="identities per pack to measure (comma-separated)")
    p.add_argument("--compile-mode", default=None, help="reduce-overhead (CUDA graphs) or default; none = skip")
    p.add_argument("--autocast-bf16", action="store_true", help="personalization under bf16 autocast")
    p.add_argument("--gradient-checkpointing", action="store_true", help="personalization with checkpointing")
    p.add_argument("--gen-rows", type=int, help="rows of each step that estimate L_gen (default: PersonalizeConfig's)")
    args = p.parse_args()
    speed = TrainingSpeed(autocast_bf16=args.autocast_bf16, gradient_checkpointing=args.gradient_checkpointing)
    dtype = getattr(torch, args.dtype)
    model = load_base(args.base, device=args.device, dtype=dtype, random_weights=args.base == "sd21")
    packs = [1, 2, 4] if args.quick else [int(k) for k in args.packs.split(",")]
    batches = [2, 4] if args.quick else [8, 32]
    steps = 3 if args.quick else 10
    config = PersonalizeConfig(**({} if args.gen_rows is None else {"gen_rows": args.gen_rows}))
    full = config.steps  # the default config's steps
    rows = bench_personalization(model, args.device, packs, steps, full_steps=full, speed=speed, config=config)
    restore_steps = 5 if args.quick else model.config.sampling.steps  # the base's own sampler
    rows += bench_restore(model, args.device, restore_steps, batches, args.compile_mode)
    rows += bench_swap(model)
    for r in rows:
        for key in ("s_per_step", f"s_per_identity_at_{full}", "identities_per_hour", "peak_gib", "s_per_call",
                    "images_per_s", "first_call_s"):
            r.setdefault(key, "")
    payload = {"device": device_name(args.device), "base": args.base, "dtype": args.dtype,
               "command": command_line(), "rows": rows}
    table = markdown_table(rows)
    flags = "".join(["_bf16" if args.autocast_bf16 else "", "_ckpt" if args.gradient_checkpointing else "",
                     "" if args.gen_rows is None else f"_gen{args.gen_rows}"])
    stem = f"perf_{'gpu' if args.device.startswith('cuda') else 'cpu'}_{args.base}{flags}"
    write_results(stem, payload, table)
    print(table)


if __name__ == "__main__":
    main()
