"""What a base model costs: FLOPs per 128 px tile and per training sample, training samples/s,
and the seconds of one 128 px restore at the preset's sampling defaults.

On a 2-core CPU a base is designed by its FLOPs (every GFLOP at full resolution is ~0.06 s per
training sample and per denoising step), so these are the numbers a preset's design is held to.
Run it on an otherwise idle machine: times are wall-clock.

    python benchmarks/bench_base_speed.py                      # compact, batch 32 of 64 px crops
    python benchmarks/bench_base_speed.py --base tiny compact --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command_line, device_name, markdown_table, write_results  # noqa: E402


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def measure(base: str, *, crop: int, batch: int, iters: int, restores: int) -> dict:
    import torch

    from pfstorer.model import load_base
    from pfstorer.sampling import restore_batch

    model = load_base(base, random_weights=True)  # cost does not depend on the weights
    cfg = model.config
    tile = cfg.sample_size
    t = torch.tensor([cfg.train_t_max - 1])
    x = torch.rand(1, 3, tile, tile) * 2 - 1
    with torch.no_grad():
        fwd_tile = _flops(lambda: model.denoise(x, t, x))

    train = load_base(base, random_weights=True)
    train.requires_grad_(True).train()
    opt = torch.optim.AdamW([p for p in train.parameters() if p.requires_grad], lr=1e-4)

    def step(n: int) -> None:
        z = torch.rand(n, 3, crop, crop) * 2 - 1
        tt = torch.randint(0, cfg.train_t_max, (n,))
        loss = (train.denoise(z, tt, z) - z).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    per_sample = _flops(lambda: step(1))  # forward + backward (+ the optimizer's few elementwise FLOPs)
    for _ in range(2):  # warm-up
        step(batch)
    t0 = time.perf_counter()
    for _ in range(iters):
        step(batch)
    samples_s = batch * iters / (time.perf_counter() - t0)

    face = (torch.rand(1, 3, tile, tile) * 255).to(torch.uint8)
    restore_batch(model, face, seeds=[0])  # warm-up
    times = []
    for i in range(restores):
        t0 = time.perf_counter()
        restore_batch(model, face, seeds=[i])
        times.append(time.perf_counter() - t0)
    s = cfg.sampling
    return {
        "base": base, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "gflop_fwd_128px_tile" if tile == 128 else f"gflop_fwd_{tile}px_tile": round(fwd_tile, 3),
        f"gflop_train_sample_{crop}px": round(per_sample, 3),
        f"train_samples_s_b{batch}_{crop}px": round(samples_s, 1),
        "sampling": f"{s.sampler} {s.steps} from t={s.t_start}",
        f"restore_s_{tile}px": round(sorted(times)[len(times) // 2], 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", nargs="+", default=["compact"], help="presets to measure")
    ap.add_argument("--crop", type=int, default=64, help="training crop side (px)")
    ap.add_argument("--batch", type=int, default=32, help="training batch")
    ap.add_argument("--iters", type=int, default=8, help="timed training steps")
    ap.add_argument("--restores", type=int, default=5, help="timed restores (the median is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="base_speed_cpu", help="results file stem")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    rows = [measure(b, crop=args.crop, batch=args.batch, iters=args.iters, restores=args.restores) for b in args.base]
    table = markdown_table(rows)
    print(table)
    write_results(args.name, {"device": device_name("cpu"), "command": command_line(), "threads": args.threads,
                              "rows": rows}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
