"""Peak memory and time of tiled restoration vs. image size.

    .venv/bin/python benchmarks/bench_tiling.py                       # tiny, 512..4096 px, 1 step
    .venv/bin/python benchmarks/bench_tiling.py --preset tiny-latent --sizes 512 1024 2048
    .venv/bin/python benchmarks/bench_tiling.py --sizes 512 1024 --no-write   # a quick look

Every size runs in a fresh subprocess (``--worker``) so one run's high-water mark cannot leak into
the next. The worker loads the base, warms it up on one tile, builds the input image, then resets
the kernel's peak-RSS counter (``/proc/self/clear_refs`` = 5; ``ru_maxrss`` where that is not
allowed) and restores. Reported per size:

- ``peak_total_mb``: the process's peak RSS during the restore (torch + model + input included);
- ``peak_above_baseline_mb``: that minus the RSS just before the restore (input already built);
- per phase (prepare+encode, denoising loop, decode, colour fix + output) the peak above baseline;
- ``tile_working_set_mb``: the largest RSS rise *inside* one denoiser call over the RSS just before
  it, i.e. the activations of one batch of tiles: what the tile size decides;
- ``image_buffer_mb``: one float32 RGB image of the output size, and how many of those the peak
  above baseline amounts to (full-size buffers: input copy, LQ, noisy image, noise accumulator,
  scheduler temporaries, colour fix).

glibc is run with a fixed 64 KiB mmap threshold and trim threshold so that freed tensors leave RSS
at once (otherwise the heap keeps them and later peaks read low); this costs some time.
Results: ``benchmarks/results/tiling_cpu.json`` and ``.md`` (machine, command, table, growth ratios
4096 vs 1024 px, verdict on "peak memory grows < 1.5x from 1024 px to 4096 px").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PHOTO = REPO.parent / "shared" / "data" / "wild" / "person1" / "img4.jpg"  # 1024x707
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


# --- worker: one restore, measured ---------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{field}:\s+(\d+)", fh.read(), re.M).group(1))


class PeakMeter:
    """Peak RSS between checkpoints, by resetting the kernel's high-water mark (VmHWM)."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def reset(self) -> None:
        if self.resettable:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")

    def peak_kb(self) -> int:
        if self.resettable:
            return _status_kb("VmHWM")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @staticmethod
    def rss_kb() -> int:
        return _status_kb("VmRSS")


def _input_image(size: int, shape: str):
    """The wild photo (1024x707) resized so its long side is ``size`` (photo) or to size x size."""
    import torch
    import torch.nn.functional as F

    from pfstorer.images import load_image

    if PHOTO.exists():
        img = load_image(PHOTO)
    else:  # a smooth random stand-in, same statistics every run
        g = torch.Generator().manual_seed(0)
        img = F.interpolate(torch.rand(1, 3, 48, 64, generator=g), size=(707, 1024), mode="bicubic")[0].clamp(0, 1)
    h, w = img.shape[-2:]
    if shape == "square":
        hw = (size, size)
    else:
        f = size / max(h, w)
        hw = (round(h * f), round(w * f))
    return F.interpolate(img[None], size=hw, mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1).contiguous()


def worker(args: argparse.Namespace) -> dict:
    import gc

    import torch

    import pfstorer.colorfix as colorfix
    from pfstorer.model import load_base
    from pfstorer.sampling import restore
    from pfstorer.tiling import tile_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_base(args.preset)
    load_s = time.perf_counter() - t0
    warm = torch.rand(3, model.config.sample_size, model.config.sample_size)
    restore(model, warm, steps=1, tile=args.tile, overlap=args.overlap, tile_batch=args.tile_batch)
    # uint8, as `pfstorer restore` reads photos: a float32 copy would cost 12 bytes per pixel
    image = (_input_image(args.size, args.shape) * 255).round_().to(torch.uint8)
    gc.collect()

    meter = PeakMeter()
    phases: dict[str, int] = {}
    state = {"phase": "prepare+encode", "unet_ws": 0, "calls": 0, "tile_px": set()}

    def close(phase_next: str) -> None:
        phases[state["phase"]] = max(phases.get(state["phase"], 0), meter.peak_kb())
        meter.reset()
        state["phase"] = phase_next

    from_latent, denoise = model.from_latent, model.denoise
    real_color_fix = colorfix.color_fix

    def enter(phase: str) -> None:
        if state["phase"] != phase:
            close(phase)

    def denoise_w(z, t, lq, pb=None):
        enter("denoising loop")
        phases[state["phase"]] = max(phases.get(state["phase"], 0), meter.peak_kb())
        meter.reset()
        before = meter.rss_kb()
        out = denoise(z, t, lq, pb)
        peak = meter.peak_kb()
        phases[state["phase"]] = max(phases.get(state["phase"], 0), peak)
        state["unet_ws"] = max(state["unet_ws"], peak - before)
        state["calls"] += 1
        state["tile_px"].add(tuple(z.shape[-2:]))
        return out

    def from_latent_w(z):
        enter("decode")
        return from_latent(z)

    def color_fix_w(*a, **k):
        enter("colour fix + output")
        return real_color_fix(*a, **k)

    model.from_latent, model.denoise = from_latent_w, denoise_w
    colorfix.color_fix = color_fix_w  # restore_batch imports it at call time: measured in its phase

    gc.collect()
    base_kb = meter.rss_kb()
    meter.reset()
    t1 = time.perf_counter()
    cpu1 = time.process_time()
    out = restore(model, image, steps=args.steps, scale=args.scale, tile=args.tile, overlap=args.overlap,
                  tile_batch=args.tile_batch, color_fix=args.color_fix)
    seconds = time.perf_counter() - t1
    cpu_seconds = time.process_time() - cpu1
    close("done")
    peak_kb = max(phases.values())

    h, w = image.shape[-2:]
    oh, ow = out.shape[-2:]
    g = model.config.granularity
    f = model.config.vae_factor
    ph, pw = -(-oh // g) * g, -(-ow // g) * g
    tile_px = max(g, (args.tile // g) * g)
    n_tiles = len(tile_grid(ph // f, pw // f, tile_px // f, args.overlap // f))
    img_mb = 3 * oh * ow * 4 / 2**20
    mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
    return {
        "preset": args.preset,
        "size": args.size,
        "input_wh": [w, h],
        "output_wh": [ow, oh],
        "megapixels": round(oh * ow / 1e6, 3),
        "tiles": n_tiles,
        "unet_calls": state["calls"],
        "unet_input_hw": sorted(state["tile_px"]),
        "seconds": round(seconds, 2),
        "seconds_per_megapixel": round(seconds / (oh * ow / 1e6), 2),
        "cpu_seconds": round(cpu_seconds, 1),
        "cpu_seconds_per_megapixel": round(cpu_seconds / (oh * ow / 1e6), 1),
        "load_average_after": round(os.getloadavg()[0], 1),
        "load_seconds": round(load_s, 2),
        "baseline_rss_mb": mb(base_kb),
        "peak_total_mb": mb(peak_kb),
        "peak_above_baseline_mb": mb(peak_kb - base_kb),
        "phase_peak_above_baseline_mb": {k: mb(v - base_kb) for k, v in phases.items() if k != "done"},
        "tile_working_set_mb": mb(state["unet_ws"]),
        "image_buffer_mb": round(img_mb, 1),
        "peak_in_image_buffers": round((peak_kb - base_kb) / 1024 / img_mb, 1),
        "peak_meter": "VmHWM reset via /proc/self/clear_refs" if meter.resettable else "ru_maxrss",
    }


# --- parent: one subprocess per size, table, files ----------------------------------------------
def _machine() -> dict:
    import torch

    cpu = cpu_model()
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = round(int(re.search(r"MemTotal:\s+(\d+)", fh.read()).group(1)) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
    }


def _run_size(args: argparse.Namespace, preset: str, size: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--preset", preset, "--size", str(size),
           "--steps", str(args.steps), "--tile", str(args.tile), "--overlap", str(args.overlap),
           "--tile-batch", str(args.tile_batch), "--shape", args.shape, "--color-fix", args.color_fix,
           "--scale", str(args.scale), "--threads", str(args.threads)]
    env = {**os.environ, **MALLOC_ENV, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed for {preset} {size}px:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(rows: list[dict], key, a: int, b: int) -> float | None:
    by = {r["size"]: r for r in rows}
    if a not in by or b not in by:
        return None
    va, vb = key(by[a]), key(by[b])
    return round(vb / va, 2) if va else None


def _summary(rows: list[dict]) -> dict:
    out = {}
    for preset in sorted({r["preset"] for r in rows}):
        rs = [r for r in rows if r["preset"] == preset]
        total = _ratio(rs, lambda r: r["peak_total_mb"], 1024, 4096)
        above = _ratio(rs, lambda r: r["peak_above_baseline_mb"], 1024, 4096)
        ws = _ratio(rs, lambda r: r["tile_working_set_mb"], 1024, 4096)
        loop = _ratio(rs, lambda r: r["phase_peak_above_baseline_mb"].get("denoising loop", 0), 1024, 4096)
        px = _ratio(rs, lambda r: r["megapixels"], 1024, 4096)
        out[preset] = {
            "pixels_4096_vs_1024": px,
            "peak_total_4096_vs_1024": total,
            "peak_above_baseline_4096_vs_1024": above,
            "denoising_loop_peak_4096_vs_1024": loop,
            "tile_working_set_4096_vs_1024": ws,
            "acceptance_total_below_1.5x": None if total is None else total < 1.5,
            "acceptance_tile_working_set_below_1.5x": None if ws is None else ws < 1.5,
        }
    return out


def _table(rows: list[dict]) -> str:
    head = ("| preset | input | output | tiles | wall s | CPU s | CPU s/Mpx | peak total MB | peak above base MB | "
            "loop peak MB | tile working set MB | peak / image buffer |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['input_wh'][0]}x{r['input_wh'][1]} | {r['output_wh'][0]}x{r['output_wh'][1]} | "
            f"{r['tiles']} | {r['seconds']} | {r['cpu_seconds']} | {r['cpu_seconds_per_megapixel']} | {r['peak_total_mb']} | "
            f"{r['peak_above_baseline_mb']} | {r['phase_peak_above_baseline_mb'].get('denoising loop', 0)} | "
            f"{r['tile_working_set_mb']} | {r['peak_in_image_buffers']} |"
        )
    return "\n".join(lines)


def _markdown(doc: dict) -> str:
    rows, s, mach = doc["results"], doc["summary"], doc["machine"]
    out = [
        "# Tiled restoration on CPU: peak memory and time vs. image size",
        "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB, torch {mach['torch']} "
        f"({mach['torch_threads']} threads), Python {mach['python']}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in mach['load_average_at_start'])} (a shared machine: wall times "
        "depend on the other jobs; CPU seconds, the worker's user + system time, much less).  ",
        f"Settings: {doc['settings']['steps']} denoising step(s) (a step costs the same at every size per "
        f"pixel; memory does not depend on the step count), scale {doc['settings']['scale']}, "
        f"tile {doc['settings']['tile']} px, overlap {doc['settings']['overlap']} px, tile batch "
        f"{doc['settings']['tile_batch']}, colour fix {doc['settings']['color_fix']}, "
        f"{doc['settings']['shape']}-shaped uint8 inputs (the wild photo resized), as ``pfstorer restore`` reads photos.",
        "",
        _table(rows),
        "",
        "Columns: *peak total* is the process's peak RSS during the restore (torch, the model and the "
        "input image included); *peak above base* subtracts the RSS just before the restore; *loop peak* "
        "is the peak above base during the denoising loop; *tile working set* is the largest RSS rise "
        "inside one denoiser call (one batch of tiles); *peak / image buffer* counts the peak above base "
        "in float32 RGB images of the output size.",
        "",
        "## Growth from 1024 px to 4096 px input",
        "",
        "| preset | pixels | peak total | peak above base | loop peak | tile working set |",
        "|---|---|---|---|---|---|",
    ]
    for preset, v in s.items():
        out.append(f"| {preset} | {v['pixels_4096_vs_1024']}x | {v['peak_total_4096_vs_1024']}x | "
                   f"{v['peak_above_baseline_4096_vs_1024']}x | {v['denoising_loop_peak_4096_vs_1024']}x | "
                   f"{v['tile_working_set_4096_vs_1024']}x |")
    out += ["", "## Reading", "", doc["reading"], ""]
    return "\n".join(out)


READING = (
    "The networks only ever see tiles (``unet_input_hw``), so the memory they need, the tile working "
    "set, does not grow with the image. Everything full-size streams in row bands "
    "(``pfstorer.tiling.blend_rows``): the sampler step is applied in place to rows no later tile "
    "touches, LQ tiles are gathered (with their padding) from the uint8 photo per tile, the latent "
    "presets' VAE encodes and decodes tile by tile straight into the output buffer, and the colour fix "
    "runs band by band (a 31-row halo for the wavelet) in place. What grows with the image is only the "
    "uint8 input and output (3 bytes per pixel each) and the float32 sampler state z (12 bytes per pixel "
    "for the pixel-space ``tiny``, 1 byte for ``tiny-latent``, 0.25 for ``sd21``). The process's peak therefore grows "
    "far less than the pixel count; the phase peaks in the JSON show where it sits (for ``tiny`` the "
    "denoising loop: z plus one batch of tiles). On a GPU with ``sd21`` (latent, 1/48 of the RGB size) "
    "the device holds the latents and the tile working set only; see benchmarks/gpu_check.py."
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["tiny"], help="base presets (tiny, tiny-latent)")
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048, 4096], help="long side of the input, px")
    p.add_argument("--shape", choices=["square", "photo"], default="photo",
                   help="photo: the wild photo's 1024x707 aspect, long side = size; square: size x size")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--overlap", type=int, default=16)
    p.add_argument("--tile-batch", type=int, default=8)
    p.add_argument("--color-fix", default="wavelet", choices=["wavelet", "adain", "none"])
    p.add_argument("--threads", type=int, default=0, help="torch threads in the worker (0: torch's default)")
    p.add_argument("--out", type=Path, default=RESULTS / "tiling_cpu.json")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing --out file (rows of the same preset and size are replaced)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.preset = args.preset[0]
        print(json.dumps(worker(args)))
        return 0

    command = "python benchmarks/bench_tiling.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    machine = _machine()
    rows = []
    started = time.perf_counter()
    for preset in args.preset:
        for size in args.sizes:
            r = _run_size(args, preset, size)
            rows.append(r)
            print(f"{preset:12s} {r['input_wh'][0]:5d}x{r['input_wh'][1]:<5d} tiles {r['tiles']:4d}  "
                  f"{r['seconds']:8.1f} s ({r['cpu_seconds']:.0f} CPU s)  peak total {r['peak_total_mb']:8.1f} MB  above base "
                  f"{r['peak_above_baseline_mb']:8.1f} MB  loop {r['phase_peak_above_baseline_mb'].get('denoising loop', 0):8.1f} MB  "
                  f"tile ws {r['tile_working_set_mb']:6.1f} MB", flush=True)
    commands = [command.strip()]
    if args.append and args.out.exists():
        old = json.loads(args.out.read_text())
        keep = [r for r in old["results"] if (r["preset"], r["size"]) not in {(x["preset"], x["size"]) for x in rows}]
        rows = keep + rows
        commands = old.get("commands", [old.get("command")]) + commands
    doc = {
        "benchmark": "tiled restore, peak memory and time vs image size, CPU",
        "command": " && ".join(commands),
        "commands": commands,
        "machine": machine,
        "settings": {k: getattr(args, k) for k in ("steps", "scale", "tile", "overlap", "tile_batch", "color_fix", "shape")}
        | {"malloc_env": MALLOC_ENV},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "results": rows,
        "summary": _summary(rows),
        "reading": READING,
    }
    print()
    print(_table(rows))
    print(json.dumps(doc["summary"], indent=2))
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(_markdown(doc))
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
