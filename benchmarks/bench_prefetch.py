"""Personalization's data path: batches drawn on the training thread vs ahead, in the background.

Every step draws, per identity, ``batch_size`` random crops of the references, degrades them
(blur, noise, resize, JPEG) and encodes them. Without prefetching the step waits for that; with
``TrainingSpeed(prefetch=True)`` (the default) the next step's draws run in background threads
while the UNet trains (``auto``, the default, does so on a GPU only). The table gives, per step: the wall time, the time the training thread
waited for its batches, and the time spent drawing (in any thread). The adapters are the same
either way (tests/unit/test_core.py checks it bit for bit).

    python benchmarks/bench_prefetch.py                      # compact, pack 4, 30 steps (CPU)
    python benchmarks/bench_prefetch.py --device cuda --pack 16

Writes ``benchmarks/results/prefetch_<cpu|gpu>_<base>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, device_name, markdown_table, write_results  # noqa: E402

from pfstorer.config import PersonalizeConfig, TrainingSpeed  # noqa: E402
from pfstorer.images import load_image  # noqa: E402
from pfstorer.model import load_base  # noqa: E402
from pfstorer.training import PackedTrainer, PersonalizeJob  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw128"


def references(n_people: int, n_refs: int) -> list[list[torch.Tensor]]:
    """Real photos when ``../shared/data`` is there, else random images of the same size."""
    from _common import lfw_people

    if (DATA / "index.csv").is_file():
        people = [p for p in lfw_people(DATA, "bench").values() if len(p) >= n_refs][:n_people]
        return [[load_image(p) for p in photos[:n_refs]] for photos in people]
    g = torch.Generator().manual_seed(0)
    return [[torch.rand((3, 128, 128), generator=g) for _ in range(n_refs)] for _ in range(n_people)]


def measure(model, refs, *, pack: int, steps: int, warmup: int, prefetch: bool, device: str) -> dict:
    config = PersonalizeConfig(steps=warmup + steps + 10, seed=0)  # nobody finishes inside the timing
    trainer = PackedTrainer(model, config, capacity=pack, speed=TrainingSpeed(prefetch="on" if prefetch else "off"))
    for k in range(pack):
        trainer.add(PersonalizeJob(f"person{k}", refs[k % len(refs)], seed=k))
    for _ in range(warmup):
        trainer.step()
    before = dict(trainer.data_stats)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    after = trainer.data_stats
    return {
        "prefetch": prefetch,
        "identities": pack,
        "seconds_per_step": round(wall, 4),
        "wait_for_data_s_per_step": round((after["wait_s"] - before["wait_s"]) / steps, 4),
        "drawing_s_per_step": round((after["draw_s"] - before["draw_s"]) / steps, 4),
        "samples_per_second": round(pack * config.batch_size / wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="compact")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pack", type=int, default=4, help="identities trained together")
    p.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    model = load_base(args.base, device=args.device)
    refs = references(args.pack, 5)
    rows = [measure(model, refs, pack=args.pack, steps=args.steps, warmup=args.warmup, prefetch=flag,
                    device=args.device) for flag in (False, True)]
    table = markdown_table(rows)
    print(table)
    if not args.no_save:
        kind = "gpu" if args.device.startswith("cuda") else "cpu"
        payload = {"benchmark": "prefetch", "device": device_name(args.device), "command": command_line(),
                   "base": args.base, "rows": rows}
        js, md = write_results(f"prefetch_{kind}_{args.base}", payload, table)
        print(f"-> {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
