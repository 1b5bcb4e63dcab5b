"""``pfstorer demo``: the whole main job, end to end, on embedded defaults.

1. people: one sub-folder of photos per person (``--photos``; default ``../shared/data/demo`` and
   ``../shared/data/wild`` beside the checkout; without any photos, the public-domain astronaut
   photo shipped with scikit-image, augmented into references: a smoke run only);
2. a Parquet manifest over two tenants (photos are referenced where they are, never copied);
3. ``pfstorer run``: validation, Ray Train personalization, MLflow registration, adapter index;
4. the Serve app on 127.0.0.1; each person's held-out photo is degraded and restored over HTTP
   with the base model and with the person's adapter;
5. a report (Markdown + PNG): input | base | 0 steps | personalized | original, offline metrics,
   credits. "0 steps" is the adapter the person's references make before any fine-tuning (the
   base's reference prior with their cached features; the base itself when no prior ships),
   restored in the driver with the Python API beside the served ones; and the personalization
   benchmark's gate on its report people for this base (:mod:`demo.benchmark_note`).

Everything runs locally: Ray in-process, MLflow on SQLite and the artifact store under the state
folder (``.pfstorer-state/demo``, ignored by git). It shuts everything down when done.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_STATE = REPO / ".pfstorer-state" / "demo"
SHARED_DATA = REPO.parent / "shared" / "data"
CREDITS = {
    "demo": "Lisa DeBruine, webmorphR.stim (CC BY 4.0)",
    "wild": "test images of the deepface project (MIT-licensed repository; web photos)",
    "astronaut": "NASA (public domain), via scikit-image",
}
# the sample people's suggested references (../shared/data/demo/README.md); others: their first photos
REFERENCES = {"lisa": ["lisa1.jpg", "lisa3.jpg", "lisa4.jpg", "zoom15cm.jpg", "zoom45cm.jpg"]}
MAX_REFS, MAX_HELD_OUT = 5, 3
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp")
METRICS = ["psnr", "ssim", "id_facenet", "niqe"]


@dataclass
class Person:
    tenant: str
    identity: str
    refs: list[Path]
    held_out: list[Path]
    credit: str


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXT and not p.name.startswith("."))


def people_from_folders(roots: list[tuple[Path, str]], tenants: tuple[str, str]) -> list[Person]:
    """One person per sub-folder with >= 4 photos, spread over the two tenants: up to 5 references,
    and up to 3 of the other photos held out (scored over several, one photo is an anecdote)."""
    people = []
    for root, credit in roots:
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            photos = _photos(folder)
            if len(photos) < 4:
                continue
            wanted = REFERENCES.get(folder.name)
            refs = [p for p in photos if p.name in wanted] if wanted else photos[: min(MAX_REFS, len(photos) - 1)]
            held = [p for p in photos if p not in refs][:MAX_HELD_OUT]
            people.append(Person("", folder.name, refs, held, credit))
    for i, person in enumerate(people):
        person.tenant = tenants[0] if i == 0 else tenants[1]  # 1 person for tenant A, the rest for B
    return people


def astronaut_people(workdir: Path) -> list[Person]:
    """Smoke-run fallback: augmented views of scikit-image's astronaut as one person's photos."""
    import numpy as np
    from skimage import data

    from pfstorer.images import from_pil, save_image, to_pil

    img = from_pil(to_pil(torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1).float() / 255))
    folder = workdir / "astronaut"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    views = []
    for i in range(6):
        s = int(rng.integers(300, 420))
        y, x = int(rng.integers(0, 512 - s)), int(rng.integers(0, 512 - s))
        v = img[:, y : y + s, x : x + s]
        if i % 2:
            v = v.flip(-1)
        v = (v * float(rng.uniform(0.85, 1.15))).clamp(0, 1)
        path = folder / f"view{i}.png"
        save_image(v, path)
        views.append(path)
    return [Person("studio-a", "astronaut", views[:5], views[5:], CREDITS["astronaut"])]


def choose_people(photos: Path | None, state_dir: Path, tenants: tuple[str, str],
                  shared: Path = SHARED_DATA) -> tuple[list[Person], bool]:
    """The demo's people and whether this is a smoke run: ``--photos``, else the sample people of
    ``../shared/data`` (demo, wild), else the astronaut fallback (then says so, loudly)."""
    if photos is not None:
        people = people_from_folders([(photos, f"photos from {photos}")], tenants)
    elif shared.is_dir():
        roots = [(shared / n, CREDITS[n]) for n in ("demo", "wild") if (shared / n).is_dir()]
        people = people_from_folders(roots, tenants)
    else:
        people = []
    if people:
        return people, False
    where = f"{photos} has no person folders with photos" if photos is not None else (
        "../shared/data is not beside this checkout and no --photos given")
    print(f"no photos found ({where}):\n"
          "SMOKE RUN ONLY - one 'person' made of augmented views of scikit-image's astronaut photo.", flush=True)
    return astronaut_people(state_dir / "photos"), True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_manifest(people: list[Person], path: Path) -> Path:
    from pipelines.manifest import write_manifest

    rows = []
    for p in people:
        for role, photos in (("ref", p.refs), ("restore", p.held_out)):
            rows += [{"tenant": p.tenant, "identity": p.identity, "role": role, "uri": str(f),
                      "credit": p.credit, "licence": None, "notes": None} for f in photos]
    return Path(write_manifest(rows, str(path)))


def _degraded_pair(photo: Path, max_side: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(original framed on its face, as references are in training, and shrunk to at most
    max_side; its heavy degradation)."""
    from pfstorer.degradations import degrade
    from pfstorer.framing import frame_face
    from pfstorer.images import load_image, resize

    img = frame_face(load_image(photo))
    h, w = img.shape[-2:]
    f = min(1.0, max_side / max(h, w))
    if f < 1:
        img = resize(img, (max(8, round(h * f)), max(8, round(w * f))))
    return img, degrade(img, "heavy", seed)


@dataclass
class Scored:
    """One held-out photo's restorations, scored against its original."""

    person: Person
    photo: str
    adapter: str
    metrics: dict[str, Any]  # "input" | "base" | "zero" | "personalized" -> compute_metrics results
    changed: float  # mean |personalized - base| in 8-bit levels


def _restore_both(client: Any, person: Person, degraded: torch.Tensor, key: str,
                  restore_steps: int | None) -> tuple[dict[str, torch.Tensor], str, int]:
    """The photo restored over HTTP by the base and by the person's adapter:
    ({"base": .., "personalized": ..}, the adapter that served it, the denoising steps served)."""
    from pfstorer.images import decode_image, encode_png

    outs, adapter, steps = {}, "?", 0
    for mode in ("base", "personalized"):
        form = {"seed": "0"} if restore_steps is None else {"steps": str(restore_steps), "seed": "0"}
        if mode == "personalized":
            form["identity"] = person.identity
        r = client.post("/v1/restore", data=form, files={"image": ("input.png", encode_png(degraded), "image/png")},
                        headers={"Authorization": f"Bearer {key}"})
        if r.status_code != 200:
            raise RuntimeError(f"restore of {person.identity} ({mode}) failed: {r.status_code} {r.text}")
        outs[mode] = decode_image(r.content)
        steps = int(r.headers["X-PFStorer-Steps"])
        if mode == "personalized":
            adapter = r.headers.get("X-PFStorer-Adapter", "?")
        print(f"  {person.tenant}/{person.identity}: {mode} restore over HTTP "
              f"(adapter {r.headers.get('X-PFStorer-Adapter', '-')})", flush=True)
    return outs, adapter, steps


class ZeroStep:
    """Each person's 0-step adapter (the references over the base's prior, no fine-tuning),
    restored with the Python API as the server restores: same base, seed and steps."""

    def __init__(self, base: str) -> None:
        from pfstorer.model import load_base
        from pfstorer.prior import USE_BASE_PRIOR, resolve_prior

        self.model = load_base(base)
        self.adapters: dict[tuple[str, str], Any] = {}  # one per person, for all their held-out photos
        prior = resolve_prior(self.model, USE_BASE_PRIOR)
        self.label = ("0 steps" if prior is None else f"0 steps (prior {prior.sha256[:12]})")
        self.has_prior = prior is not None
        self.fingerprint = self.model.fingerprint

    def restore(self, person: Person, degraded: torch.Tensor, steps: int) -> torch.Tensor:
        from pfstorer.images import load_image
        from pfstorer.sampling import restore
        from pfstorer.training import PersonalizeConfig, personalize

        key = (person.tenant, person.identity)
        if key not in self.adapters:
            self.adapters[key] = personalize(self.model, [load_image(p) for p in person.refs], identity=person.identity,
                                             tenant=person.tenant, config=PersonalizeConfig(steps=0))
        return restore(self.model, degraded, adapter=self.adapters[key], seed=0, steps=steps)


def run_demo(
    photos: Path | None = None,
    *,
    state_dir: Path = DEFAULT_STATE,
    base: str | None = None,
    steps: int | None = None,
    restore_steps: int | None = None,
    max_side: int = 512,
    fresh: bool = True,
) -> Path:
    """Run the demo; returns the report's path."""
    import httpx
    from pfstorer.ray_env import prepare_ray

    prepare_ray(local=True)
    import ray
    from ray import serve

    from pfstorer.images import save_image
    from pfstorer.metrics import compute_metrics
    from pfstorer.model import WEIGHTS_DIR
    from pfstorer.settings import Settings
    from pipelines.run import run_manifest
    from serving.app import APP_NAME, build_application
    from serving.auth import hash_key

    t_start = time.perf_counter()
    if fresh and state_dir.exists():
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    tenants = ("studio-a", "studio-b")
    people, smoke = choose_people(photos, state_dir, tenants)
    if base is None:
        base = "compact" if (WEIGHTS_DIR / "compact" / "model.safetensors").exists() else "tiny"
    if steps is None:  # CPU-sized: 3 people in a few minutes on 2 cores (docs/personalization.md)
        steps = 40 if base.startswith("tiny") else 60
    print(f"demo: {len(people)} people over {len({p.tenant for p in people})} tenant(s), base {base!r}, "
          f"{steps} personalization steps (paper: 500; fewer on CPU)", flush=True)

    keys = {t: "pfs_demo_" + secrets.token_hex(16) for t in tenants}
    keyfile = state_dir / "api-keys.yaml"
    keyfile.write_text("tenants:\n" + "".join(f"  {t}:\n    - {hash_key(k)}\n" for t, k in keys.items()))
    port = _free_port()
    settings = Settings.load(state_dir=state_dir, base=base, workers=1, cpus_per_worker=2,
                             personalize={"steps": steps},
                             serve={"host": "127.0.0.1", "port": port, "api_keys_file": str(keyfile),
                                    "num_cpus": 0.5, "max_ongoing_requests": 2, "max_queued_requests": 8})
    manifest = _write_manifest(people, state_dir / "manifest.parquet")
    print(f"manifest: {manifest}", flush=True)

    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address="local", num_cpus=4, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        summary = run_manifest(str(manifest), settings, steps=steps, progress=True)
        print(summary.table(), flush=True)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        rows, row_labels, table = [], [], []
        served_steps = restore_steps
        zero = ZeroStep(base)
        with httpx.Client(base_url=url, timeout=600) as client:
            for i, person in enumerate(people):
                for j, photo in enumerate(person.held_out):
                    original, degraded = _degraded_pair(photo, max_side, seed=100 + 10 * i + j)
                    outs, adapter, served_steps = _restore_both(client, person, degraded, keys[person.tenant],
                                                                restore_steps)
                    outs["zero"] = zero.restore(person, degraded, served_steps)
                    pdir = state_dir / "report" / person.identity / photo.stem
                    for name, img in (("input", degraded), *outs.items(), ("original", original)):
                        save_image(img, pdir / f"{name}.png")
                    metrics = {m: compute_metrics(img, original, names=METRICS)
                               for m, img in (("input", degraded), *outs.items())}
                    rows.append([degraded, outs["base"], outs["zero"], outs["personalized"], original])
                    row_labels.append(f"{person.tenant}/{person.identity} {photo.name}")
                    changed = float((outs["personalized"] - outs["base"]).abs().mean()) * 255  # 8-bit levels
                    table.append(Scored(person, photo.name, adapter, metrics, changed))
        report = _write_report(state_dir / "report", rows, row_labels, table, base, steps, served_steps,
                               smoke, time.perf_counter() - t_start, summary, zero)
    finally:
        if own_ray:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        else:
            serve.delete(APP_NAME)
    print(f"report: {report}", flush=True)
    return report


def _fmt(result: Any) -> str:
    if result is None or result.value is None:
        return "n/a"
    return f"{result.value:.3f}" if abs(result.value) < 100 else f"{result.value:.1f}"


def _adapter_effect(table: list[Scored]) -> list[str]:
    """What each person's adapter changed against the base, in numbers: per person the mean over
    their held-out photos, then over all photos and how many photos it helped."""
    def delta(row: Scored, name: str, adapter: str = "personalized") -> float | None:
        a, b = row.metrics[adapter].get(name), row.metrics["base"].get(name)
        return None if a is None or b is None or a.value is None or b.value is None else a.value - b.value

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    def cell(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    lines = ["## What the adapters changed", "",
             "| person | photos | mean change of the output (8-bit levels) | PSNR personalized - base (dB) | "
             "ID personalized - base (FaceNet cos x 100) | ID 0 steps - base |", "| --- | --- | --- | --- | --- | --- |"]
    ids, psnrs, zero_ids = [], [], []
    for person in dict.fromkeys(row.person.identity for row in table):
        rows = [row for row in table if row.person.identity == person]
        d_psnr = [d for row in rows if (d := delta(row, "psnr")) is not None]
        d_id = [d * 100 for row in rows if (d := delta(row, "id_facenet")) is not None]
        d_zero = [d * 100 for row in rows if (d := delta(row, "id_facenet", "zero")) is not None]
        ids, psnrs, zero_ids = ids + d_id, psnrs + d_psnr, zero_ids + d_zero
        lines.append(f"| {rows[0].person.tenant}/{person} | {len(rows)} | {mean([r.changed for r in rows]):.2f} | "
                     f"{cell(mean(d_psnr), '+.2f')} | {cell(mean(d_id), '+.1f')} | {cell(mean(d_zero), '+.1f')} |")
    if ids:
        lines += ["", f"Mean over {len(ids)} held-out photos: ID {mean(ids):+.1f} points, PSNR "
                  f"{cell(mean(psnrs), '+.2f')} dB; the adapter raised ID on {sum(d > 0 for d in ids)} of {len(ids)}; "
                  f"with 0 fine-tuning steps, ID {cell(mean(zero_ids), '+.1f')}. "
                  "A handful of photos: read these as an example, the benchmark (docs/personalization.md) as "
                  "the measurement."]
    return lines + [""]


def _write_report(out: Path, rows, row_labels, table, base: str, steps: int, restore_steps: int,
                  smoke: bool, seconds: float, summary: Any, zero: ZeroStep) -> Path:
    from demo.benchmark_note import benchmark_section
    from pfstorer.evaluate import make_grid
    from pfstorer.images import save_image

    out.mkdir(parents=True, exist_ok=True)
    grid = make_grid(rows, ["input (degraded)", "base", zero.label, "personalized", "original"], row_labels=row_labels)
    save_image(grid, out / "report.png")
    lines = ["# pfstorer demo report", ""]
    if smoke:
        lines += ["**SMOKE RUN ONLY**: no photos were found, so one 'person' was made of augmented views of "
                  "scikit-image's astronaut photo. It shows the machinery works, not what personalization does.", ""]
    weights = ("random weights (the `tiny` test preset): outputs are not meaningful restorations"
               if base.startswith("tiny") else f"the shipped `{base}` weights (see pfstorer/weights/{base}/MODEL_CARD.md)")
    lines += [f"Base model: `{base}` - {weights}.",
              f"Personalization: {steps} steps per person on CPU (the paper uses 500 on a GPU); "
              f"restoration: {restore_steps} denoising step{'' if restore_steps == 1 else 's'}, served over HTTP by Ray Serve on 127.0.0.1.",
              f"Run: {len(summary.by_status('done'))} trained, {len(summary.by_status('skipped'))} skipped, "
              f"{len(summary.by_status('failed'))} failed; whole demo {seconds:.0f} s.",
              "Each person's held-out photos (never shown to the adapter) are cut to the face as references "
              "are in training, heavily degraded, and restored by the base alone, by the adapter their references "
              "make with 0 fine-tuning steps, and by the person's fine-tuned adapter. "
              + ("The 0-step adapter starts from the base's reference prior (docs/model.md)." if zero.has_prior else
                 "No reference prior ships with this base, so the 0-step adapter is the base itself (alpha = 0)."), "",
              "![input | base | 0 steps | personalized | original](report.png)", "",
              "| person | photo | image | PSNR | SSIM | ID (FaceNet cos) | NIQE |", "| --- | --- | --- | --- | --- | --- | --- |"]
    backends: dict[str, str] = {}
    for row in table:
        for m, label in (("input", "input (degraded)"), ("base", "base"), ("zero", zero.label),
                         ("personalized", f"personalized ({row.adapter})")):
            cells = [_fmt(row.metrics[m].get(name)) for name in METRICS]
            lines.append(f"| {row.person.tenant}/{row.person.identity} | {row.photo} | {label} | " + " | ".join(cells) + " |")
            backends.update({n: r.backend for n, r in row.metrics[m].items() if r is not None and r.value is not None})
    lines += ["", "PSNR, SSIM and ID (FaceNet cosine of the face in the image and in the original) against the "
              "original; NIQE is no-reference (lower is better). Backends: "
              + "; ".join(f"{n}: {b}" for n, b in sorted(backends.items())) + ".", ""]
    lines += _adapter_effect(table)
    lines += benchmark_section(base, zero.fingerprint)
    lines += ["## Credits", ""]
    for credit in sorted({row.person.credit for row in table}):
        who = ", ".join(dict.fromkeys(row.person.identity for row in table if row.person.credit == credit))
        lines.append(f"- {who}: {credit}")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(args: Any) -> int:
    """``pfstorer demo`` (the parser is in :mod:`demo.cli`)."""
    run_demo(args.photos, state_dir=args.state_dir or DEFAULT_STATE, base=args.base, steps=args.steps,
             restore_steps=args.restore_steps, max_side=args.max_side, fresh=not args.keep)
    return 0
