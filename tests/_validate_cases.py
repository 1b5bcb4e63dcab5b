"""The validation test case both the local and the Ray/S3 validation tests judge: four good people
and bad rows of every kind, with the quarantine they must get."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pytest

T = "acme"


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel data is a few bytes of nothing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def row(identity: str, role: str, uri, tenant: str = T, **extra) -> dict:
    return {"tenant": tenant, "identity": identity, "role": role, "uri": None if uri is None else str(uri), **extra}


@pytest.fixture
def case(lfw_bench: dict[str, list[Path]], tmp_path: Path) -> dict:
    """A manifest of 4 good people + bad rows; returns rows, people and the expected quarantine."""
    from PIL import Image

    big = [n for n, p in lfw_bench.items() if len(p) >= 8]
    a, b, c, d = big[:4]
    e, f, o = [n for n in lfw_bench if n not in big[:4]][:3]
    other = lfw_bench[o]
    ph = {n: [str(p) for p in lfw_bench[n]] for n in (a, b, c, d, e, f)}

    missing = tmp_path / "missing.jpg"
    text = tmp_path / "text.jpg"
    text.write_text("this is not a photo\n")
    truncated = tmp_path / "truncated.jpg"
    data = other[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tiny)
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(9000, 9000))
    copy = tmp_path / "dup" / "copy.jpg"
    copy.parent.mkdir()
    copy.write_bytes(Path(ph[c][0]).read_bytes())

    rows = []
    for n in (a, b, c, d):
        rows += [row(n, "ref", p, batch=1) for p in ph[n][:5]]
        rows.append(row(n, "restore", ph[n][5], batch=1))
    kept_dup, dropped_dup = sorted([str(copy), ph[c][0]])
    expected = {
        (T, a, "ref", str(missing)): ("read", "unreadable: file not found"),
        (T, a, "ref", str(text)): ("image", "image is text, not a supported image type (accepted: JPEG, PNG, WEBP)"),
        (T, a, "ref", str(truncated)): ("image", "image is corrupt or truncated"),
        (T, b, "ref", str(tiny)): ("image", "image is 16x16, smaller than the minimum side of 64 px"),
        (T, b, "ref", str(huge)): ("image", "image is 9000x9000 = 81,000,000 pixels, over the limit of 16,777,216 pixels"),
        (T, c, "ref", dropped_dup): ("dedup", f"duplicate: same bytes as {kept_dup}"),
        (T, d, "restore", ph[d][0]): ("dedup", f"duplicate: same photo as {ph[d][0]}"),
        (T, "../x", "ref", ph[a][6]): ("schema", "unsafe identity: '../x' is not a safe key"),
        ("a.b", a, "ref", ph[a][6]): ("schema", "unsafe tenant: 'a.b' is not a safe key"),
        (T, a, "train", ph[a][6]): ("schema", "bad role: 'train' (must be 'ref' or 'restore')"),
        (T, a, "ref", None): ("schema", "missing field: uri"),
        (T, e, "ref", ph[e][0]): ("refs", "person has 2 good references, needs >= 3"),
        (T, e, "ref", ph[e][1]): ("refs", "person has 2 good references, needs >= 3"),
        (T, e, "restore", ph[e][2]): ("refs", "person has 2 good references, needs >= 3"),
        # f: three references of which one is broken -> the broken one keeps its own reason
        (T, f, "ref", ph[f][0]): ("refs", "person has 2 good references, needs >= 3"),
        (T, f, "ref", ph[f][1]): ("refs", "person has 2 good references, needs >= 3"),
        (T, f, "ref", str(tmp_path / "f-missing.jpg")): ("read", "unreadable: file not found"),
    }
    rows.append(row(c, "ref", copy, batch=2))
    for (tenant, ident, role, uri), _ in expected.items():
        if (tenant, ident, role, uri) == (T, c, "ref", dropped_dup):
            continue  # already among the good rows
        rows.append(row(ident, role, uri, tenant=tenant, batch=2))
    good = {
        a: (ph[a][:5], ph[a][5:6]),
        b: (ph[b][:5], ph[b][5:6]),
        c: (sorted(({str(copy)} | set(ph[c][:5])) - {dropped_dup}), ph[c][5:6]),
        d: (ph[d][:5], ph[d][5:6]),
    }
    return {"rows": rows, "expected": expected, "good": good}


def quarantine_map(result) -> dict:
    return {
        (r["tenant"], r["identity"], r["role"], r["uri"]): (r["stage"], r["reason"])
        for r in result.quarantine.to_pylist()
    }


def check(result, case) -> None:
    got = quarantine_map(result)
    assert result.quarantine.num_rows == len(case["expected"])  # no row quarantined twice
    assert set(got) == set(case["expected"])
    for key, (stage, reason) in case["expected"].items():
        assert got[key] == (stage, reason), key
    # jobs: exactly the good people, their references intact
    assert [k[1] for k in result.jobs] == sorted(case["good"])
    for (tenant, ident), job in result.jobs.items():
        refs, restores = case["good"][ident]
        assert tenant == T
        assert job.ref_uris == sorted(refs)
        assert job.ref_sha256s == [sha(u) for u in sorted(refs)]
        assert [r["uri"] for r in job.restores] == sorted(restores)
        assert all(r["width"] == 128 and r["height"] == 128 for r in job.refs)
        assert job.refs[0]["batch"] == 1 or job.refs[0]["batch"] == 2  # extra columns kept
    # good + quarantine partition the manifest; extra columns survive in both
    assert result.good.num_rows + result.quarantine.num_rows == len(case["rows"])
    assert "batch" in result.quarantine.column_names and "batch" in result.good.column_names
    roles = result.good.column("role").to_pylist()
    shas = result.good.column("sha256").to_pylist()
    assert all(s is not None for s, r in zip(shas, roles) if r == "ref")
    assert all(s is None for s, r in zip(shas, roles) if r == "restore")  # judged from the header


def spy_probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URIs that :func:`pipelines.probe.probe_uri` is asked about from now on."""
    import pipelines.probe as probe

    seen: list[str] = []
    real = probe.probe_uri

    def spy(uri: str, *args, **kwargs):
        seen.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(probe, "probe_uri", spy)
    return seen
