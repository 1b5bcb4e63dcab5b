"""What the ``pfstorer run`` tests share: the manifest rows of LFW people, their registered
versions, and settings on the ``tiny`` base."""

from __future__ import annotations

from pathlib import Path

from registry import AdapterRegistry

STEPS = 2
KILL_STEPS = 4  # a worker is killed mid-training: its people have saved state by then


def people_rows(lfw_bench: dict[str, list[Path]], names: list[str], tenant: str, refs=None):
    rows = []
    for i, name in enumerate(names):
        n = refs if refs is not None else 3 + i % 3  # 3-5 references each
        rows += [
            {"tenant": tenant, "identity": name, "role": "ref", "uri": str(p)}
            for p in lfw_bench[name][:n]
        ]
    return rows


def versions(registry: AdapterRegistry, tenant: str, names: list[str]) -> dict[str, list[int]]:
    return {n: [v.version for v in registry.models.versions(tenant, n)] for n in names}


def settings_for(state: Path, steps: int = STEPS, **kw):
    from pfstorer.settings import Settings

    return Settings.load(None, state_dir=state, base="tiny", personalize={"steps": steps}, **kw)
