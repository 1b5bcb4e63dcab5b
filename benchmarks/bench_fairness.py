"""Can one tenant slow another? ``pfstorer serve`` with one model replica and two tenants.

The heavy tenant keeps the replica busy with the largest requests its budget allows (a
``--heavy-side`` px photo at the most steps ``serve.max_pixel_steps`` admits, as many at once
as ``serve.max_tenant_requests`` lets it), sending each again when it ends. The light tenant
sends ``--light-side`` px photos one at a time: first on the idle replica, then while the heavy
tenant saturates it. Gate: the light tenant's p95 latency under load <= 3x its p95 on the idle
replica, measured in the same run. Writes benchmarks/results/fairness_<device>.{json,md}.

    python benchmarks/bench_fairness.py            # compact base, server defaults
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, cpu_model, free_port, markdown_table, write_results  # noqa: E402


def _photo(side: int, noise: float) -> bytes:
    """A synthetic photo, smooth gradients plus ``noise``: the restore cost is what matters. The
    heavy photo has none, so that its PNG stays far under the upload limit (as an attacker's would)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side
    img = np.stack([y, x, (x + y) / 2], -1) * 200 + rng.normal(0, noise, (side, side, 3))
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="compact")
    ap.add_argument("--heavy-side", type=int, default=4096, help="side of the heavy tenant's photos")
    ap.add_argument("--light-side", type=int, default=128, help="side of the light tenant's photos")
    ap.add_argument("--idle", type=int, default=10, help="light requests on the idle replica")
    ap.add_argument("--loaded", type=int, default=20, help="light requests while the heavy tenant saturates")
    args = ap.parse_args()

    import httpx

    from pfstorer.settings import ServeSettings
    from serving.auth import generate_key, hash_key

    d = ServeSettings()
    heavy_steps = max(1, min(d.max_steps, d.max_pixel_steps // (args.heavy_side**2)))
    with tempfile.TemporaryDirectory(prefix="pfstorer-fair-") as tmp:
        root = Path(tmp)
        from registry import AdapterIndex

        AdapterIndex(root / "index").create()  # empty: the server is ready, nobody resolves
        keys = {"heavy": generate_key(), "light": generate_key()}
        (root / "keys.yaml").write_text("tenants:\n" + "".join(f"  {t}: ['{hash_key(k)}']\n" for t, k in keys.items()))
        port = free_port()
        (root / "settings.yaml").write_text(
            f"base: {args.base}\ndevice: cpu\nstate_dir: {root / 'state'}\nindex_url: {root / 'index'}\n"
            f"store_url: {root / 'store'}\nserve:\n  host: 127.0.0.1\n  port: {port}\n"
            f"  api_keys_file: {root / 'keys.yaml'}\n")
        log = open(root / "serve.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "pfstorer.cli", "serve", "--config", str(root / "settings.yaml")],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        pool = concurrent.futures.ThreadPoolExecutor(d.max_tenant_requests)
        try:
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None:
                    raise SystemExit((root / "serve.log").read_text()[-3000:])
                time.sleep(0.5)
            print(f"server ready on {url}", flush=True)

            def post(tenant: str, data: bytes, steps: int, timeout: float) -> tuple[int, float]:
                t0 = time.perf_counter()
                r = httpx.post(f"{url}/v1/restore", headers={"Authorization": f"Bearer {keys[tenant]}"},
                               files={"image": ("p.png", data)}, data={"steps": str(steps)}, timeout=timeout)
                return r.status_code, time.perf_counter() - t0

            light = _photo(args.light_side, 8.0)

            def light_run(n: int) -> list[float]:
                out = []
                for _ in range(n):
                    code, took = post("light", light, 1, 120)
                    assert code == 200, code
                    out.append(took)
                return out

            light_run(2)  # warm the path
            idle = light_run(args.idle)
            print(f"idle: p50 {statistics.median(idle):.3f}s p95 {_percentile(idle, 95):.3f}s", flush=True)
            heavy = _photo(args.heavy_side, 0.0)
            done = threading.Event()
            heavy_codes: list[int] = []

            def saturate() -> None:
                while not done.is_set():
                    code, _ = post("heavy", heavy, heavy_steps, d.request_timeout_s + 60)
                    heavy_codes.append(code)

            for _ in range(d.max_tenant_requests):
                pool.submit(saturate)
            time.sleep(5.0)  # every heavy request admitted, one of them running
            if heavy_codes:
                raise SystemExit(f"the heavy requests were answered at once ({heavy_codes[:5]}): not a load")
            t_load = time.perf_counter()
            loaded = light_run(args.loaded)
            load_s = time.perf_counter() - t_load
            heavy_during = list(heavy_codes)
            done.set()
            print(f"loaded: p50 {statistics.median(loaded):.3f}s p95 {_percentile(loaded, 95):.3f}s "
                  f"over {load_s:.0f}s; heavy answers meanwhile {heavy_during}", flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGINT)  # ends the heavy requests too
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
            pool.shutdown(wait=True, cancel_futures=True)

    p95_idle, p95_loaded = _percentile(idle, 95), _percentile(loaded, 95)
    ratio = p95_loaded / p95_idle
    gate = ratio <= 3.0
    rows = [
        {"light tenant": "idle replica", "requests": len(idle), "p50 s": statistics.median(idle),
         "p95 s": p95_idle, "max s": max(idle)},
        {"light tenant": "heavy tenant saturating", "requests": len(loaded), "p50 s": statistics.median(loaded),
         "p95 s": p95_loaded, "max s": max(loaded)},
    ]
    table = markdown_table(rows)
    notes = (f"\n\nHeavy tenant: {d.max_tenant_requests} requests in flight at all times, each a "
             f"{args.heavy_side}x{args.heavy_side} photo at {heavy_steps} steps "
             f"({args.heavy_side**2 * heavy_steps:,} pixel-steps, budget {d.max_pixel_steps:,}), sent again "
             f"as each ends ({len(heavy_during)} heavy answers during the light tenant's "
             f"{load_s:.0f} s: {sorted(set(heavy_during))}).\n"
             f"Light tenant: {args.light_side} px photos at 1 step, one at a time.\n\n"
             f"**p95 under load / p95 idle = {ratio:.2f}** (gate <= 3): {'met' if gate else 'NOT met'}.\n"
             f"One replica (serve.num_cpus 1, one torch thread), base `{args.base}`, server defaults otherwise; "
             f"load average before the run: {os.getloadavg()[0]:.1f}.")
    print(table + notes)
    payload = {"device": f"CPU {cpu_model()} x{os.cpu_count()} cores, no GPU", "command": command_line(),
               "base": args.base, "heavy_side": args.heavy_side, "heavy_steps": heavy_steps,
               "heavy_in_flight": d.max_tenant_requests, "heavy_answers_during": heavy_during, "loaded_for_s": load_s,
               "idle_s": idle, "loaded_s": loaded, "p95_idle_s": p95_idle, "p95_loaded_s": p95_loaded,
               "ratio": ratio, "gate_met": gate}
    write_results("fairness_cpu", payload, table + notes)


if __name__ == "__main__":
    main()
