"""Personalization benchmark (the paper's Table 2 and Fig. 9 on our data).

On the lfw128 bench people (never trained on), split once by name (``--split``; see
``_common.bench_split``): 30 ``tune`` people, on whom settings may be chosen, and the ``report``
people, the rest, whose numbers are the ones published; the demo's people are in neither. Each
person's first ``--refs`` photos (sorted by file name) are the references, the rest are test
photos, degraded ``light`` and/or ``heavy`` with fixed seeds. Rows:

- **Input**: the degraded photo itself;
- **Base**: the frozen base model alone;
- **Base + full fine-tune**: every base weight trained on the references with PFStorer's L_diff
  (same crops, degradations, timesteps and distance) and steps, no adapters (the paper's
  DreamBooth row, without prior preservation);
- **Base + adapters, no alpha**: personalization blocks with alpha fixed at 1
  (``PersonalizeConfig(learn_alpha=False)``; the paper's ViCo row);
- **PFStorer**: personalization blocks with the learnable alpha (``PersonalizeConfig()``), started
  from the base's reference prior when it ships one (``--prior``).

``--steps 0`` measures the start alone: each adapter is the reference prior with the person's
cached references and no fine-tuning (without a prior it is the base itself); the fine-tune and
no-alpha rows are left out and the gate is :data:`PRIOR_GATES` (heavy ID >= Base + 3). A control
row, **PFStorer, another person's references**, restores each person with the same prior given the
next person's references: a gain both rows share is the prior's generic restoration, not identity.

Columns: PSNR, SSIM, ST-LPIPS, NIQE, LMSE, ID (FaceNet cosine x 100), ID dlib (x 100), each the mean over test
photos (``None`` where a metric could not be computed, counted in ``n``), then the gate
(:data:`GATES`): heavy, PFStorer's ID >= Base + 8 with the low end of its 95 % bootstrap interval
over people >= +4, PSNR at most 0.3 dB below Base's, ID raised on >= 75 % of photos; light, ID >=
Base at PSNR at most 0.2 dB below.

``--lambda-gen-sweep`` replaces the Table 2 rows by PFStorer at lambda_gen in {0, 0.1, 0.5, 1}
(the paper's Fig. 9) and draws ``lambda_gen_<level>.png`` (input | base | each lambda_gen |
original) and ``lambda_gen_<level>_plot.png`` (ID and PSNR against lambda_gen).

Writes ``benchmarks/results/personalization_<level>_<base>_<card>[_sweep|_gate][_0steps][_tune].md`` and ``.json``
naming the card, the command and every setting. Example (CPU smoke run)::

    python benchmarks/bench_personalization.py --people 2 --steps 20 --max-test 2 --level heavy
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import bench_split, bootstrap_interval, lfw_people  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "lfw128"
RESULTS = REPO / "benchmarks" / "results"
COLUMNS = [("psnr", "PSNR", 1.0), ("ssim", "SSIM", 1.0), ("st_lpips", "ST-LPIPS", 1.0), ("niqe", "NIQE", 1.0),
           ("lmse", "LMSE", 1.0), ("id_facenet", "ID", 100.0), ("id_dlib", "ID dlib", 100.0)]


# -- data ------------------------------------------------------------------------------------------
def demo_people(shared: Path) -> set[str]:
    """Names of the people ``make demo`` shows (folders of ``shared/demo`` and ``shared/wild``): in no split."""
    return {p.name for d in ("demo", "wild") if (shared / d).is_dir() for p in (shared / d).iterdir() if p.is_dir()}


def bench_people(data: Path, people: int | None, n_refs: int, max_test: int | None,
                 split: str = "report") -> list[dict[str, Any]]:
    """Bench people of one part of the split (:func:`_common.bench_split`; sorted by name) with
    >= n_refs + 1 photos: references and test photos."""
    everyone = {n: ph for n, ph in lfw_people(data, "bench").items() if len(ph) > n_refs}
    names = set(bench_split(list(everyone), split, exclude=demo_people(data.parent)))
    out = []
    for name, photos in everyone.items():
        if name not in names:
            continue
        tests = photos[n_refs:] if max_test is None else photos[n_refs : n_refs + max_test]
        out.append({"identity": name, "refs": photos[:n_refs], "tests": tests})
        if people is not None and len(out) >= people:
            break
    return out


OTHER_REFS = "PFStorer, another person's references"


def others_references(identities: Sequence[str], refs: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """For each person, the references of the next person in ``identities`` (the last gets the
    first's): never their own, and the same photos in every run of the same people."""
    if len(identities) < 2:
        raise ValueError("another person's references need at least two people")
    return {who: refs[identities[(k + 1) % len(identities)]] for k, who in enumerate(identities)}


def degraded_tests(person_index: int, tests: Sequence[Path], level: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ground truth, degraded) per test photo; the seed depends only on person, photo and level."""
    from pfstorer.degradations import degrade
    from pfstorer.images import load_image

    base = {"light": 10_000, "heavy": 20_000}[level]
    out = []
    for j, p in enumerate(tests):
        gt = load_image(p)
        out.append((gt, degrade(gt, level, base + 1000 * person_index + j)))
    return out


# -- the full fine-tune row ------------------------------------------------------------------------
def full_finetune(model, refs: Sequence[torch.Tensor], *, steps: int, lr: float, config, seed: int,
                  bf16: bool = False):
    """A copy of ``model`` with every weight trained on the references: the L_diff rows of
    personalization (same crops, degradations, timesteps, starts and distance), no adapters."""
    from pfstorer.degradations import random_crop_resize, synthesize_lq
    from pfstorer.losses import distance
    from pfstorer.model import RestorationModel
    from pfstorer.sampling import diffuse

    # a fresh model, not copy.deepcopy: the SFT hooks are closures over their own model
    m = RestorationModel(model.config).to(model.device, model.dtype)
    m.load_state_dict(model.state_dict())
    m.requires_grad_(True)
    if m.vae is not None:
        m.vae.requires_grad_(False)
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    size, b = m.config.sample_size, config.batch_size
    t_start = m.config.sampling.t_start
    p_start = config.p_lq_start if t_start < m.config.num_train_timesteps else 0.0
    dist = distance(config, m)
    use_bf16 = bf16 and m.device.type == "cuda"
    for _ in range(steps):
        hq, lq = [], []
        for _ in range(b):
            crop = random_crop_resize(refs[int(rng.integers(len(refs)))], size, rng, config.crop_scale)
            hq.append(crop)
            lq.append(synthesize_lq(crop, rng, levels=config.levels, p_hq=config.p_hq))
        with torch.no_grad():
            z0, lq_lat = m.to_latent(torch.stack(hq)), m.to_latent(torch.stack(lq))
        t = torch.randint(0, m.config.train_t_max, (b,), generator=gen)
        start = torch.rand(b, generator=gen) < p_start
        t = torch.where(start, torch.full_like(t, t_start), t).to(m.device)
        noise = torch.randn(z0.shape, generator=gen).to(m.device)
        src = torch.where(start.view(-1, 1, 1, 1).to(m.device), lq_lat, z0)
        with torch.autocast(m.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = m.denoise(diffuse(m, src.float(), noise, t).to(m.dtype), t, lq_lat)
        loss = dist(pred.float(), m.target(z0.float(), noise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    m.invalidate_fingerprint()
    return m.freeze()


# -- scoring -----------------------------------------------------------------------------------------
def score(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float | None]:
    from pfstorer.metrics import compute_metrics

    res = compute_metrics(pred, gt, names=[name for name, _, _ in COLUMNS])
    return {name: (None if res[name].value is None else float(res[name].value) * scale) for name, _, scale in COLUMNS}


def summarize(rows: list[dict[str, float | None]]) -> dict[str, Any]:
    out: dict[str, Any] = {"images": len(rows)}
    for name, _, _ in COLUMNS:
        vals = [r[name] for r in rows if r[name] is not None and math.isfinite(r[name])]
        out[name] = float(np.mean(vals)) if vals else None
        out[f"{name}_n"] = len(vals)
    return out


def _restore_all(model, lqs: list[torch.Tensor], adapter, seeds: list[int], steps: int | None) -> list[torch.Tensor]:
    from pfstorer.sampling import restore

    return [restore(model, x, adapter=adapter, seed=s, steps=steps) for x, s in zip(lqs, seeds, strict=True)]


def _log(msg: str) -> None:
    print(f"[bench_personalization] {msg}", file=sys.stderr, flush=True)


# -- the run -------------------------------------------------------------------------------------------
def card_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import os

    return f"CPU ({os.cpu_count()} cores), no GPU"


class Progress:
    """Each scored person, one JSON line in ``path`` (nothing kept when ``path`` is None), so a run
    stopped at any point goes on with ``--resume PATH``; the first line holds the settings and a
    file made with other ones is refused rather than mixed in."""

    def __init__(self, path: Path | None, settings: dict[str, Any]) -> None:
        self.path, self.done = path, {}
        if path is None:
            return
        settings = json.loads(json.dumps(settings))
        if path.exists() and path.stat().st_size:
            lines = path.read_text().splitlines()
            if json.loads(lines[0]) != settings:
                raise SystemExit(f"error: {path} was made with other settings; use another --resume file")
            for line in lines[1:]:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run killed while writing it
                    continue
                self.done[int(row["person"])] = row["scored"]
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(settings) + "\n")

    def save(self, person: int, scored: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"person": person, "scored": scored}) + "\n")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pfstorer.model import load_base
    from pfstorer.config import TrainingSpeed
    from pfstorer.training import PersonalizeConfig, PersonalizeJob, personalize_many

    t_start = time.perf_counter()
    dtype = torch.float32
    model = load_base(args.base, device=args.device, dtype=dtype)
    people = bench_people(Path(args.data), args.people, args.refs, args.max_test, args.split)
    levels = ["light", "heavy"] if args.level == "both" else [args.level]
    from pfstorer.images import load_image

    refs = {p["identity"]: [load_image(r) for r in p["refs"]] for p in people}

    if args.steps is None:
        args.steps = PersonalizeConfig().steps
    start_only = args.steps == 0  # the reference prior alone: nothing is fine-tuned
    pc = {"steps": args.steps, "seed": args.seed, "prior": args.prior}
    if args.gen_rows is not None:
        pc["gen_rows"] = args.gen_rows
    variants: dict[str, PersonalizeConfig] = {"PFStorer": PersonalizeConfig(**pc)}
    if args.lambda_gen_sweep:  # Fig. 9: PFStorer at each lambda_gen (the default's row is PFStorer's)
        for lg in (0.0, 0.1, 0.5, 1.0):
            variants[f"PFStorer, lambda_gen={lg:g}"] = PersonalizeConfig(**pc, lambda_gen=lg)
    elif not (args.gate_only or start_only):  # Table 2
        variants["Base + adapters, no alpha"] = PersonalizeConfig(**pc, learn_alpha=False)
    # the prior alone: the same adapters made from another person's references, a control for
    # how much of a 0-step gain comes from the person's own photos rather than from the prior
    control = [OTHER_REFS] if start_only and len(people) > 1 else []
    trained = {row: (cfg, refs) for row, cfg in variants.items()}  # what each row's adapters learn from
    if control:
        trained[OTHER_REFS] = (variants["PFStorer"], others_references([p["identity"] for p in people], refs))
    timings: dict[str, float] = {}
    sweep_rows = [row for row in variants if row.startswith("PFStorer, lambda_gen")]
    table_rows = ["Input", "Base"] + (["Base + full fine-tune"] if not (args.lambda_gen_sweep or args.gate_only
                                                                         or start_only) else []) + list(variants) + control
    figures: dict[str, list[list[torch.Tensor]]] = {level: [] for level in levels}
    # per person: {level: {row: [scores of each test photo]}}; kept in --resume's file as it grows
    scored: dict[int, dict[str, dict[str, list]]] = {}
    progress = Progress(args.resume, {
        "base": model.fingerprint, "split": args.split, "refs": args.refs, "max_test": args.max_test,
        "levels": levels, "rows": table_rows, "steps": args.steps, "sample_steps": args.sample_steps,
        "seed": args.seed, "ft_lr": args.ft_lr, "prior": args.prior, "identities": [p["identity"] for p in people],
        "personalize": variants["PFStorer"].model_dump(mode="json")})  # a changed default refuses the file too
    scored.update(progress.done)
    resumed = len(scored)  # people scored by earlier runs: wall_s and the timings are this run's only
    if scored:
        _log(f"resuming: {len(scored)} of {len(people)} people already scored ({args.resume})")
    personalized = 0
    prior_used: str | None = None
    for start in range(0, len(people), args.capacity):  # packed: the same adapters as one at a time
        chunk = [(i, p) for i, p in enumerate(people[start:start + args.capacity], start) if i not in scored]
        if not chunk:
            continue
        adapters: dict[str, dict[str, Any]] = {}
        for row, (cfg, row_refs) in trained.items():
            same = next((r for r in adapters if trained[r][0] == cfg and trained[r][1] is row_refs), None)
            if same is not None:  # the same config twice (the sweep's default lambda_gen): the same adapters
                adapters[row] = adapters[same]
                continue
            t0 = time.perf_counter()
            jobs = [PersonalizeJob(p["identity"], row_refs[p["identity"]], seed=args.seed + i) for i, p in chunk]
            speed = TrainingSpeed(autocast_bf16=args.bf16 and model.device.type == "cuda")
            got = personalize_many(model, jobs, config=cfg, capacity=args.capacity, speed=speed)
            adapters[row] = {a.identity: a for a in got}
            prior_used = got[0].metadata.config.get("prior_sha256")
            timings[f"personalize: {row}"] = timings.get(f"personalize: {row}", 0.0) + time.perf_counter() - t0
        personalized += len(chunk)
        for i, p in chunk:
            scored[i] = {}
            ft = None
            for level in levels:
                rows = scored[i][level] = {row: [] for row in table_rows}
                pairs = degraded_tests(i, p["tests"], level)
                gts, lqs = [g for g, _ in pairs], [x for _, x in pairs]
                seeds = [args.seed + 100 * i + j for j in range(len(lqs))]
                rows["Input"] = [score(x, g) for x, g in zip(lqs, gts, strict=True)]
                outs = _restore_all(model, lqs, None, seeds, args.sample_steps)
                rows["Base"] = [score(x, g) for x, g in zip(outs, gts, strict=True)]
                if "Base + full fine-tune" in rows:
                    t0 = time.perf_counter()
                    if ft is None:  # trained once, scored at every level
                        ft = full_finetune(model, refs[p["identity"]], steps=args.steps, lr=args.ft_lr,
                                           config=variants["PFStorer"], seed=args.seed + i, bf16=args.bf16)
                    timings["full fine-tune"] = timings.get("full fine-tune", 0.0) + time.perf_counter() - t0
                    outs = _restore_all(ft, lqs, None, seeds, args.sample_steps)
                    rows["Base + full fine-tune"] = [score(x, g) for x, g in zip(outs, gts, strict=True)]
                swept: dict[str, list[torch.Tensor]] = {}
                for row in trained:
                    outs = _restore_all(model, lqs, adapters[row][p["identity"]], seeds, args.sample_steps)
                    rows[row] = [score(x, g) for x, g in zip(outs, gts, strict=True)]
                    swept[row] = outs
                if sweep_rows and len(figures[level]) < args.figure_rows:  # Fig. 9: the first test photo
                    base_out = _restore_all(model, lqs[:1], None, seeds[:1], args.sample_steps)[0]
                    figures[level].append([lqs[0], base_out] + [swept[r][0] for r in sweep_rows] + [gts[0]])
            progress.save(i, scored[i])
            _log(f"person {i + 1}/{len(people)} personalized, restored and scored")

    results: dict[str, Any] = {}
    contrasts: dict[str, Any] = {}
    order = sorted(scored)
    for level in levels:
        per_row = {row: [x for i in order for x in scored[i][level][row]] for row in table_rows}
        owners = [i for i in order for _ in scored[i][level]["Input"]]  # for intervals over people
        results[level] = {row: summarize(v) for row, v in per_row.items()}
        contrasts[level] = against_pfstorer(per_row, owners)  # its Base row is what the gate judges
        results[level]["gate"] = gate(level, results[level], contrasts[level]["Base"],
                                      PRIOR_GATES if start_only else GATES)
    if personalized:  # what one identity costs at these settings, packed --capacity at a time
        timings["personalize per identity (PFStorer)"] = timings["personalize: PFStorer"] / personalized
    report_figures = {}
    for level, rows in figures.items():
        if rows:
            report_figures[level] = _save_sweep_figures(args.out, level, rows, sweep_rows, results[level])
    return {
        "figures": report_figures,
        "card": card_name(args.device), "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "base": args.base, "base_fingerprint": model.fingerprint, "people": len(people), "split": args.split,
        "identities": [p["identity"] for p in people],
        "test_photos": sum(len(p["tests"]) for p in people), "settings": vars(args) | {"data": str(args.data)},
        "personalize": variants["PFStorer"].model_dump(mode="json"),
        "prior_sha256": prior_used,
        "results": results, "against_pfstorer": contrasts,
        "timings_s": timings, "wall_s": time.perf_counter() - t_start, "resumed_people": resumed,
    }


# PFStorer against Base, per level: mean ID gain, the lower end of its 95 % interval over people,
# the most PSNR it may lose, the share of photos whose ID it must raise.
GATES = {"heavy": {"id_gain": 8.0, "id_gain_low": 4.0, "psnr_loss": 0.3, "helped": 0.75},
         "light": {"id_gain": 0.0, "id_gain_low": None, "psnr_loss": 0.2, "helped": None}}
# The reference prior alone (``--steps 0``): heavy ID >= Base + 3; light as fine-tuned.
PRIOR_GATES = {"heavy": {"id_gain": 3.0, "id_gain_low": None, "psnr_loss": None, "helped": None},
               "light": GATES["light"]}


def per_photo_gains(pf: list[dict[str, float | None]], base: list[dict[str, float | None]],
                    owners: list[int]) -> dict[str, Any]:
    """PFStorer minus another row (Base for the gate) on each test photo both scored: the mean ID
    gain and PSNR change with 95 % bootstrap intervals over people, and the share of photos whose
    ID PFStorer raised."""
    keep = [k for k, (a, b) in enumerate(zip(pf, base, strict=True))
            if a["id_facenet"] is not None and b["id_facenet"] is not None]
    d_id = [pf[k]["id_facenet"] - base[k]["id_facenet"] for k in keep]
    d_psnr = [pf[k]["psnr"] - base[k]["psnr"] for k in keep]
    who = [owners[k] for k in keep]
    return {"paired_id_gain": sum(d_id) / len(d_id) if d_id else None,
            "paired_psnr_change": sum(d_psnr) / len(d_psnr) if d_psnr else None,
            "id_gain_interval": bootstrap_interval(d_id, who) if d_id else None,
            "psnr_change_interval": bootstrap_interval(d_psnr, who) if d_psnr else None,
            "helped": sum(d > 0 for d in d_id) / len(d_id) if d_id else None, "photos": len(d_id)}


def against_pfstorer(per_row: dict[str, list[dict[str, float | None]]], owners: list[int]) -> dict[str, Any]:
    """PFStorer minus every other restoring row, paired on each photo, with 95 % intervals over
    people: whether PFStorer beats an ablation row (no alpha, full fine-tune) or only matches it
    within the spread of people."""
    return {row: per_photo_gains(per_row["PFStorer"], other, owners)
            for row, other in per_row.items() if row not in ("Input", "PFStorer")}


def gate(level: str, rows: dict[str, Any], gains: dict[str, Any],
         gates: dict[str, dict[str, Any]] = GATES) -> dict[str, Any]:
    """The acceptance gate of one level: PFStorer against Base (:data:`GATES`, or
    :data:`PRIOR_GATES` for the prior alone)."""
    pf, base, need = rows["PFStorer"], rows["Base"], gates[level]
    d_id, d_psnr = pf["id_facenet"] - base["id_facenet"], pf["psnr"] - base["psnr"]
    checks = [d_id >= need["id_gain"]]
    if need["psnr_loss"] is not None:
        checks.append(d_psnr >= -need["psnr_loss"])
    if need["id_gain_low"] is not None:
        checks.append(gains["id_gain_interval"] is not None and gains["id_gain_interval"][0] >= need["id_gain_low"])
    if need["helped"] is not None:
        checks.append(gains["helped"] is not None and gains["helped"] >= need["helped"])
    return {"id_gain": d_id, "psnr_change": d_psnr, "needed": need, **gains, "passed": bool(all(checks))}


def _save_sweep_figures(out: Path, level: str, rows: list[list[torch.Tensor]], sweep_rows: list[str],
                        summary: dict[str, Any]) -> dict[str, str]:
    """The paper's Fig. 9 (input | base | PFStorer at each lambda_gen | original) and a plot of
    ID and PSNR against lambda_gen; returns their file names."""
    from pfstorer.evaluate import make_grid
    from pfstorer.images import save_image

    out.mkdir(parents=True, exist_ok=True)
    lambdas = [float(r.rsplit("=", 1)[1]) for r in sweep_rows]
    labels = ["input", "base"] + [f"lambda_gen {lg:g}" for lg in lambdas] + ["original"]
    grid = out / f"lambda_gen_{level}.png"
    save_image(make_grid(rows, labels), grid)
    files = {"grid": grid.name}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the eval extra is not installed: the grid and the table still are
        return files
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ids = [summary[r]["id_facenet"] for r in sweep_rows]
    ax.plot(lambdas, ids, "o-", color="tab:blue", label="ID (FaceNet x100)")
    ax.axhline(summary["Base"]["id_facenet"], color="tab:blue", ls=":", label="Base ID")
    ax.set_xlabel("lambda_gen")
    ax.set_ylabel("ID", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(lambdas, [summary[r]["psnr"] for r in sweep_rows], "s-", color="tab:red", label="PSNR")
    ax2.axhline(summary["Base"]["psnr"], color="tab:red", ls=":")
    ax2.set_ylabel("PSNR (dB)", color="tab:red")
    ax.set_title(f"{level}: identity and fidelity against lambda_gen")
    fig.tight_layout()
    plot = out / f"lambda_gen_{level}_plot.png"
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    files["plot"] = plot.name
    return files


def wall_note(report: dict[str, Any]) -> str:
    """What the wall time covers when ``--resume`` took people over from earlier runs."""
    n = report.get("resumed_people") or 0
    return f" (this run; {n} of the {report['people']} people were scored by earlier runs with --resume)" if n else ""


def contrast_lines(contrasts: dict[str, Any]) -> list[str]:
    """The Markdown table of :func:`against_pfstorer` (nothing for files written before it)."""
    if not contrasts:
        return []
    lines = ["PFStorer minus each row, paired per photo (95 % intervals over people):", "",
             "| row | ID change | ID 95 % | PSNR change (dB) | PSNR 95 % | photos PFStorer's ID is higher |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row, c in contrasts.items():
        if not c["photos"]:  # no photo with an ID score in both rows (metrics not installed)
            lines.append(f"| {row} | — | — | — | — | 0 photos |")
            continue
        idi, pi = c["id_gain_interval"], c["psnr_change_interval"]
        lines.append(f"| {row} | {c['paired_id_gain']:+.2f} | [{idi[0]:+.2f}, {idi[1]:+.2f}] | {c['paired_psnr_change']:+.2f} "
                     f"| [{pi[0]:+.2f}, {pi[1]:+.2f}] | {c['helped']:.0%} of {c['photos']} |")
    return lines + [""]


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Personalization benchmark ({report['base']} base)", "",
             f"Card: **{report['card']}**. {report['people']} bench people of the {report.get('split', 'report')} "
             f"split, {report['test_photos']} test photos, "
             f"personalization {report['settings']['steps']} steps of {report['personalize']['batch_size']} samples, "
             f"{report['settings']['sample_steps'] or 'default'} sampling steps, "
             f"adapters started from {'reference prior ' + report['prior_sha256'][:12] if report.get('prior_sha256') else 'zero'}. "
             f"Wall time {report['wall_s']:.0f} s{wall_note(report)}.", "", f"Command: `{report['command']}`", ""]
    arrows = {"psnr": "↑", "ssim": "↑", "st_lpips": "↓", "niqe": "↓", "lmse": "↓", "id_facenet": "↑", "id_dlib": "↑"}
    for level, rows in report["results"].items():
        lines += [f"## {level}", "", "| method | " + " | ".join(f"{lab} {arrows[n]}" for n, lab, _ in COLUMNS) + " |",
                  "| --- |" + " --- |" * len(COLUMNS)]
        for row, s in rows.items():
            if row == "gate":
                continue
            cells = ["—" if s[n] is None else f"{s[n]:.4g}" for n, _, _ in COLUMNS]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        g, need = rows["gate"], rows["gate"]["needed"]
        lo_hi = g["id_gain_interval"] or (float("nan"), float("nan"))
        asked = [f"ID >= Base + {need['id_gain']:g}"]
        asked += [f"PSNR >= Base - {need['psnr_loss']:g} dB"] if need["psnr_loss"] is not None else []
        asked += [f"interval low end >= +{need['id_gain_low']:g}"] if need["id_gain_low"] is not None else []
        asked += [f"ID raised on >= {need['helped']:.0%} of photos"] if need["helped"] is not None else []
        lines += ["", f"Gate ({level}: {', '.join(asked)}): ID {g['id_gain']:+.2f} (95 % over people "
                  f"[{lo_hi[0]:+.2f}, {lo_hi[1]:+.2f}]), PSNR {g['psnr_change']:+.2f} dB, ID raised on "
                  f"{(g['helped'] or 0):.0%} of {g['photos']} photos: **{'pass' if g['passed'] else 'fail'}**", ""]
        lines += contrast_lines(report.get("against_pfstorer", {}).get(level, {}))
        for kind, name in report.get("figures", {}).get(level, {}).items():
            lines += [f"![{level} lambda_gen {kind}]({name})", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="compact")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--split", choices=["tune", "report"], default="report",
                   help="bench people to use: tune (30, where settings may be chosen) or report (the rest; "
                        "what is published). Fixed by name, see benchmarks/_common.py bench_split")
    p.add_argument("--people", type=int, default=100, help="first N people of the split (default: all of them)")
    p.add_argument("--refs", type=int, default=5, help="references per person (paper: 5)")
    p.add_argument("--max-test", type=int, help="at most this many test photos per person")
    p.add_argument("--level", choices=["light", "heavy", "both"], default="both")
    p.add_argument("--steps", type=int, help="personalization / fine-tune steps (default: PersonalizeConfig's; paper: 500)")
    p.add_argument("--gen-rows", type=int, help="rows of each step that estimate L_gen (default: PersonalizeConfig's)")
    p.add_argument("--sample-steps", type=int, help="denoising steps per restore (default: the base's)")
    p.add_argument("--prior", default="base",
                   help="where adapters start: base (the base's reference prior, if it ships one), none (zero), "
                        "or a prior.safetensors of this base")
    p.add_argument("--ft-lr", type=float, default=1e-5, help="learning rate of the full fine-tune row")
    p.add_argument("--capacity", type=int, default=16, help="identities personalized together (packed)")
    p.add_argument("--lambda-gen-sweep", action="store_true",
                   help="PFStorer at lambda_gen 0/0.1/0.5/1 instead of the Table 2 rows, with the Fig. 9 figures")
    p.add_argument("--gate-only", action="store_true",
                   help="only the rows the gate compares (Input, Base, PFStorer): a quick check of a setting")
    p.add_argument("--figure-rows", type=int, default=6, help="people shown in the lambda_gen figure (Fig. 9)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the adapters and the fine-tune row (CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--resume", type=Path, metavar="FILE",
                   help="keep each scored person in FILE (JSON lines) and skip those already there: a long "
                        "run stopped at any point goes on from where it was")
    args = p.parse_args(argv)
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", report["card"].lower()).strip("-")
    kind = ("_sweep" if args.lambda_gen_sweep else "_gate" if args.gate_only else "") + (
        "_0steps" if args.steps == 0 else "") + ("_tune" if args.split == "tune" else "")
    stem = args.out / f"personalization_{args.level}_{args.base}_{slug}{kind}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))
    print(f"-> {stem}.md / .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
