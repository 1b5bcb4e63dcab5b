"""GPU check of the sd21-shaped base: personalization and (tiled) restoration speed and memory.

On a GPU machine (random weights of the real SD-2.1-base + StableSR shapes, bf16, nothing downloaded):

    .venv/bin/python benchmarks/gpu_check.py                 # sd21, cuda, bf16
    .venv/bin/python benchmarks/gpu_check.py --dtype float16 --restore-steps 20

On a CPU-only machine it stops with a message; a smoke run of the same code paths:

    .venv/bin/python benchmarks/gpu_check.py --base tiny --device cpu --dtype bfloat16

Measured (each with ``torch.cuda.synchronize()`` around the timed region, after warm-up):
1. personalization: ``PackedTrainer`` steps for 1 identity and for ``--pack`` identities at once
   (fwd + bwd + AdamW), seconds per step, samples per second, peak memory; then
   ``pfstorer.training.personalize`` end to end with a few steps (the adapter used below);
2. restoration at the native size (512 px for sd21) with that adapter: seconds per denoising step
   (from a 1-step and an N-step run, so VAE encode/decode are not in it), whole-restore time,
   peak memory;
3. tiled restoration at 1024 and 2048 px: tiles, seconds, seconds per step, peak memory, and the
   growth of peak memory from the smallest to the largest size (the tiling acceptance: < 1.5x).

Writes ``benchmarks/results/gpu_check_<card>.json`` and ``.md`` (card name, command, settings,
results). Peak memory is ``torch.cuda.max_memory_allocated`` (reset before each measurement); on the
CPU smoke run it is the process's peak RSS above the RSS before the measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WILD = REPO.parent / "shared" / "data" / "wild"
EXIT_NO_DEVICE = 2


# --- devices, timing, memory ---------------------------------------------------------------------
class Meter:
    """Wall time with device sync, and peak memory (CUDA allocator, or RSS on CPU)."""

    def __init__(self, device) -> None:
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        self.sync()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)
            self._base = self.torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                pass
            self._base = _status_kb("VmRSS") * 1024

    def peak_gib(self) -> float:
        """Peak since ``reset``: absolute for CUDA (what the card had to hold), above base for RSS."""
        self.sync()
        if self.cuda:
            return self.torch.cuda.max_memory_allocated(self.device) / 2**30
        return max(0, _status_kb("VmHWM") * 1024 - self._base) / 2**30

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{field}:\s+(\d+)", fh.read(), re.M).group(1))


def _card(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()}"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


# --- inputs ---------------------------------------------------------------------------------------
def _photos(n: int) -> list:
    """``n`` photos of one person from ../shared/data/wild (random images where it is absent)."""
    import torch

    from pfstorer.images import load_image

    paths = sorted((WILD / "person1").glob("*.jpg"))[:n] if WILD.is_dir() else []
    if len(paths) >= n:
        return [load_image(p) for p in paths]
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 600, 480, generator=g) for _ in range(n)]


def _photo_of(size: int):
    """A wild photo (or a smooth random image) resized to ``size`` x ``size``."""
    import torch
    import torch.nn.functional as F

    img = _photos(1)[0]
    return F.interpolate(img[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)


# --- the checks -----------------------------------------------------------------------------------
def check_personalization(model, meter: Meter, args, refs) -> list[dict]:
    import torch

    from pfstorer.training import PackedTrainer, PersonalizeConfig, PersonalizeJob

    rows = []
    for pack in sorted({1, args.pack}):
        # more steps than are run: no identity finishes (probe, reference cache) inside the timing
        config = PersonalizeConfig(steps=args.warmup + args.train_steps + 10, batch_size=args.batch_size, seed=0)
        trainer = PackedTrainer(model, config, capacity=pack)
        for k in range(pack):
            trainer.add(PersonalizeJob(f"person{k}", refs, seed=k))
        for _ in range(args.warmup):
            trainer.step()
        # the crops and degradations are drawn on the CPU (numpy), ahead of the step in background
        # threads: the step waits only for what is not ready yet (trainer.data_stats)
        before = dict(trainer.data_stats)
        meter.reset()
        t0 = meter.now()
        for _ in range(args.train_steps):
            trainer.step()
        dt = (meter.now() - t0) / args.train_steps
        draw_dt = (trainer.data_stats["draw_s"] - before["draw_s"]) / args.train_steps
        wait_dt = (trainer.data_stats["wait_s"] - before["wait_s"]) / args.train_steps
        samples = pack * args.batch_size  # L_diff samples; L_gen adds its rows to the batch
        losses = [s.curve[-1] for s in trainer.slots.values() if s.curve]
        rows.append({
            "identities": pack,
            "batch_rows": pack * trainer.rows_per_identity,
            "samples_per_step": samples,
            "seconds_per_step": round(dt, 4),
            "cpu_data_seconds_per_step": round(draw_dt, 4),
            "data_wait_seconds_per_step": round(wait_dt, 4),
            "model_seconds_per_step": round(dt - wait_dt, 4),
            "samples_per_second": round(samples / dt, 1),
            "peak_memory_gib": round(meter.peak_gib(), 2),
            "last_losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
        })
        del trainer
        if meter.cuda:
            torch.cuda.empty_cache()
    return rows


def check_personalize_end_to_end(model, meter: Meter, args, refs):
    from pfstorer.training import PersonalizeConfig, personalize

    meter.reset()
    t0 = meter.now()
    adapter = personalize(model, refs, identity="gpu-check", config=PersonalizeConfig(steps=args.train_steps, seed=0))
    seconds = meter.now() - t0
    finite = all(bool(v.float().isfinite().all()) for v in adapter.tensors.values())
    return adapter, {
        "steps": args.train_steps,
        "seconds": round(seconds, 2),
        "peak_memory_gib": round(meter.peak_gib(), 2),
        "adapter_tensors_finite": finite,
        "final_losses": adapter.metadata.final_losses,
    }


def _restore_timed(model, meter: Meter, image, adapter, steps: int, tile: int, overlap: int):
    from pfstorer.sampling import restore

    meter.reset()
    t0 = meter.now()
    out = restore(model, image, adapter=adapter, steps=steps, tile=tile, overlap=overlap, seed=0)
    return out, meter.now() - t0, meter.peak_gib()


def check_restore(model, meter: Meter, args, adapter, size: int) -> dict:
    from pfstorer.tiling import tile_grid

    image = _photo_of(size)
    tile = min(args.tile, size)
    _restore_timed(model, meter, _photo_of(tile), adapter, 1, tile, args.overlap)  # warm-up (kernels, VAE)
    out1, t1, peak1 = _restore_timed(model, meter, image, adapter, 1, tile, args.overlap)
    outn, tn, peakn = _restore_timed(model, meter, image, adapter, args.restore_steps, tile, args.overlap)
    f = model.config.vae_factor
    g = model.config.granularity
    side = -(-size // g) * g
    tiles = len(tile_grid(side // f, side // f, max(g, tile // g * g) // f, args.overlap // f))
    per_step = (tn - t1) / (args.restore_steps - 1) if args.restore_steps > 1 else tn
    return {
        "size": size,
        "tile": tile,
        "overlap": args.overlap,
        "tiles": tiles,
        "steps": args.restore_steps,
        "seconds": round(tn, 3),
        "seconds_1_step": round(t1, 3),
        "seconds_per_step": round(per_step, 4),
        "peak_memory_gib": round(max(peak1, peakn), 3),
        "output_finite": bool(outn.isfinite().all()) and bool(out1.isfinite().all()),
        "output_hw": list(outn.shape[-2:]),
    }


# --- driver ---------------------------------------------------------------------------------------
def _markdown(doc: dict) -> str:
    env = doc["environment"]
    lines = [
        f"# GPU check: {doc['base']} ({env['dtype']}) on {env['card']}",
        "",
        f"Command: `{doc['command']}`  ",
        f"torch {env['torch']}, CUDA {env['cuda']}, diffusers {env['diffusers']}; base built with random "
        f"weights in {doc['load_seconds']} s ({doc['parameters_m']} M parameters, {doc['weights_gib']} GiB; "
        "every peak below includes them).",
        "",
        "## Personalization (PackedTrainer: fwd + bwd + AdamW)",
        "",
        "| identities | samples/step | batch rows | s/step | CPU data prep (background) | step waits for data | model | samples/s | peak GiB | losses finite |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["personalization"]:
        lines.append(f"| {r['identities']} | {r['samples_per_step']} | {r['batch_rows']} | {r['seconds_per_step']} | "
                     f"{r['cpu_data_seconds_per_step']} | {r['data_wait_seconds_per_step']} | {r['model_seconds_per_step']} | "
                     f"{r['samples_per_second']} | {r['peak_memory_gib']} | {r['last_losses_finite']} |")
    e = doc["personalize_end_to_end"]
    lines += ["", f"`personalize()` end to end, {e['steps']} steps: {e['seconds']} s, peak {e['peak_memory_gib']} GiB, "
              f"adapter tensors finite: {e['adapter_tensors_finite']}.", "",
              "## Restoration (with the adapter)", "",
              "| input px | tile | tiles | steps | s total | s (1 step) | s/step | peak GiB | output finite |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["restore"]:
        lines.append(f"| {r['size']} | {r['tile']} | {r['tiles']} | {r['steps']} | {r['seconds']} | {r['seconds_1_step']} | "
                     f"{r['seconds_per_step']} | {r['peak_memory_gib']} | {r['output_finite']} |")
    g = doc.get("tiled_peak_growth")
    if g:
        lines += ["", f"Peak memory of tiled restore, {g['from']} px -> {g['to']} px: {g['ratio']}x "
                  f"(acceptance: < 1.5x) -> {'pass' if g['pass'] else 'FAIL'}; above the weights: "
                  f"{g['ratio_above_weights']}x."]
    lines += ["", "Problems: " + ("; ".join(doc["problems"]) if doc["problems"] else "none"), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="sd21", help="preset (sd21 on a GPU; tiny for a CPU smoke run)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--train-steps", type=int, default=10, help="timed personalization steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--batch-size", type=int, default=2, help="LQ samples per identity per step")
    p.add_argument("--pack", type=int, default=8, help="identities trained together in the packed measurement")
    p.add_argument("--restore-steps", type=int, default=20)
    p.add_argument("--sizes", type=int, nargs="+", help="restore sizes, px (default: native, 2x, 4x native)")
    p.add_argument("--tile", type=int, help="tile, px (default: the native size)")
    p.add_argument("--overlap", type=int, help="tile overlap, px (default: 1/8 tile)")
    p.add_argument("--refs", type=int, default=5, help="reference photos")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False). Run it on a GPU machine, "
              "or smoke-test the code paths on CPU with: "
              "python benchmarks/gpu_check.py --base tiny --device cpu --dtype bfloat16", file=sys.stderr)
        return EXIT_NO_DEVICE
    if device.type == "cpu" and args.base == "sd21":
        print("gpu_check: sd21 on a CPU would take hours; use --base tiny for a CPU smoke run", file=sys.stderr)
        return EXIT_NO_DEVICE
    dtype = getattr(torch, args.dtype)

    import diffusers

    from pfstorer.model import load_base

    meter = Meter(device)
    t0 = time.perf_counter()
    model = load_base(args.base, random_weights=True, device=device, dtype=dtype)
    meter.sync()
    load_s = time.perf_counter() - t0
    weights_gib = sum(x.numel() * x.element_size() for x in model.parameters()) / 2**30
    native = model.config.sample_size
    args.tile = args.tile or native
    args.overlap = args.tile // 8 if args.overlap is None else args.overlap
    sizes = args.sizes or [native, 2 * native, 4 * native]
    card = _card(device)
    env = {"card": card, "device": str(device), "dtype": args.dtype, "torch": torch.__version__,
           "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "python": platform.python_version()}
    print(f"{card}: {args.base} in {args.dtype}, {sum(x.numel() for x in model.parameters()) / 1e6:.0f} M parameters, "
          f"built in {load_s:.1f} s", flush=True)

    refs = _photos(args.refs)
    problems: list[str] = []
    pers = check_personalization(model, meter, args, refs)
    for r in pers:
        print(f"personalize x{r['identities']}: {r['seconds_per_step']:.4f} s/step (CPU data prep "
              f"{r['cpu_data_seconds_per_step']:.4f} in the background, waited for "
              f"{r['data_wait_seconds_per_step']:.4f}), {r['samples_per_second']} samples/s, "
              f"peak {r['peak_memory_gib']} GiB, losses finite {r['last_losses_finite']}", flush=True)
        if not r["last_losses_finite"]:
            problems.append(f"personalization losses not finite ({r['identities']} identities, {args.dtype})")
    adapter, e2e = check_personalize_end_to_end(model, meter, args, refs)
    print(f"personalize() end to end: {e2e['seconds']} s, adapter finite {e2e['adapter_tensors_finite']}", flush=True)
    if not e2e["adapter_tensors_finite"]:
        problems.append(f"adapter tensors not finite after personalize() in {args.dtype}")
    rest = []
    for size in sizes:
        r = check_restore(model, meter, args, adapter, size)
        rest.append(r)
        print(f"restore {size} px: {r['tiles']} tiles, {r['seconds']} s ({r['seconds_per_step']} s/step), "
              f"peak {r['peak_memory_gib']} GiB, finite {r['output_finite']}", flush=True)
        if not r["output_finite"]:
            problems.append(f"restore output not finite at {size} px ({args.dtype})")
    growth = None
    tiled = [r for r in rest if r["tiles"] > 1]
    if len(tiled) >= 2:
        a, b = tiled[0], tiled[-1]
        ratio = round(b["peak_memory_gib"] / a["peak_memory_gib"], 2) if a["peak_memory_gib"] else None
        wa, wb = a["peak_memory_gib"] - weights_gib, b["peak_memory_gib"] - weights_gib
        growth = {"from": a["size"], "to": b["size"], "ratio": ratio, "pass": ratio is not None and ratio < 1.5,
                  "ratio_above_weights": round(wb / wa, 2) if meter.cuda and wa > 0 else None}

    command = "python benchmarks/gpu_check.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    doc = {
        "check": "gpu_check",
        "command": command.strip(),
        "base": args.base,
        "environment": env,
        "load_seconds": round(load_s, 2),
        "parameters_m": round(sum(x.numel() for x in model.parameters()) / 1e6, 1),
        "weights_gib": round(weights_gib, 3),
        "settings": {k: getattr(args, k) for k in ("train_steps", "warmup", "batch_size", "pack", "restore_steps",
                                                   "tile", "overlap", "refs")} | {"sizes": sizes},
        "personalization": pers,
        "personalize_end_to_end": e2e,
        "restore": rest,
        "tiled_peak_growth": growth,
        "problems": problems,
    }
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"gpu_check_{_slug(card)}" + ("" if args.base == "sd21" else f"_{args.base}_smoke")
        (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        (args.out / f"{stem}.md").write_text(_markdown(doc))
        print(f"wrote {args.out / (stem + '.json')} and .md")
    if problems:
        print("PROBLEMS: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
