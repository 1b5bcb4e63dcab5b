"""``pfstorer demo`` (registered through the ``pfstorer.cli`` entry-point group); the work is in
:mod:`demo.run`, imported only when the command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pfstorer.cli import lazy

__all__ = ["register_cli"]


def register_cli(subparsers: Any) -> None:
    """Add ``demo`` to pfstorer's sub-commands."""
    d = subparsers.add_parser(
        "demo", help="run the whole job end to end on embedded defaults (make demo)",
        description="Personalize every person of a photo folder on a local Ray (Ray Train), register the "
                    "adapters in MLflow (SQLite), serve them with Ray Serve on 127.0.0.1, restore degraded "
                    "held-out photos of each person (cut to the face) over HTTP with and without their adapter, and write a "
                    "report (input | base | personalized | original + metrics) under .pfstorer-state/demo/report.")
    d.add_argument("--photos", type=Path, help="folder with one sub-folder of photos per person "
                                               "(default: ../shared/data/demo and ../shared/data/wild)")
    d.add_argument("--base", help="base preset (default: compact when its weights are shipped, else tiny)")
    d.add_argument("--steps", type=int, help="personalization steps per person (default: see docs/personalization.md)")
    d.add_argument("--restore-steps", type=int, help="denoising steps per restore (default: the base's)")
    d.add_argument("--max-side", type=int, default=512,
                   help="held-out photos are cut to the face and restored at their own size, shrunk to at most "
                        "this side (default 512: the base restores faces of every size)")
    d.add_argument("--state-dir", type=Path, help="where the demo keeps its state (default: .pfstorer-state/demo)")
    d.add_argument("--keep", action="store_true", help="keep earlier demo state (reruns skip trained people)")
    d.set_defaults(func=lazy("demo.run:run_cli"))
