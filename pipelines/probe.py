"""Probing the photos of a manifest: listings in bulk, and a read only when a photo is new.

A probe judges one photo under the image limits. References are read whole, hashed (their
sha256 goes into the person's job key) and decoded; restore photos are judged from their header
alone (the first :data:`HEADER_BYTES`), because the restore itself decodes them again.

Every probe is remembered in a :class:`ProbeCache` under ``(uri, limits)`` with the photo's
size and version (ETag, generation or mtime). Before probing, the photos' folders are listed in
bulk (:func:`list_versions`: folders that crowd under one parent in one recursive listing of it,
i.e. one S3 ListObjectsV2 per 1,000 keys, the others one ``ls`` each; :func:`listing_plan`) and
joined with the cache as Arrow columns (:meth:`ProbeCache.lookup`): a photo whose listed size and
version equal its cache row's is not touched at all, so a rerun of an unchanged manifest costs the
listing. The others (new, changed, deleted, or not found by the listing) are probed one by one
(:func:`probe_photos`), each with an ``fs.info`` first; a changed photo is read again and, as a
reference, changes its person's job key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pfstorer.errors import PFStorerError
from pfstorer.image_checks import ImageLimits, check_size, decode_photo
from pfstorer.image_checks import probe_image as probe_header
from registry import is_local_url, url_to_fs
from registry.storage import MTIME_KEYS

__all__ = [
    "BULK_FOLDERS",
    "CACHE_SCHEMA",
    "HEADER_BYTES",
    "PROBE_SCHEMA",
    "Probe",
    "ProbeCache",
    "ProbeSpec",
    "file_version",
    "known_probes",
    "list_versions",
    "listing_plan",
    "probe_photos",
    "probe_uri",
]

#: Bytes read to judge a restore photo from its header (JPEG EXIF segments fit in 64 KiB);
#: a header that does not fit is read whole.
HEADER_BYTES = 64 * 1024

CACHE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("limits", pa.string()),
        ("size", pa.int64()),
        ("version", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ],
    metadata={"pfstorer.probe_cache": "1"},
)

#: What a probe found, one row per ``(uri, role)`` (see :class:`Probe`).
PROBE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("role", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("size", pa.int64()),
        ("version", pa.string()),
        ("cached", pa.bool_()),
    ]
)
_RESULT = ("sha256", "width", "height", "stage", "reason")


@dataclasses.dataclass(frozen=True)
class Probe:
    """What one probe found: ``sha256`` (None for header-only probes), the size in pixels, or the
    failed ``stage`` (``read``/``image``) and its ``reason``; ``size``/``version`` key the cache."""

    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    stage: str | None = None
    reason: str | None = None
    size: int | None = None
    version: str | None = None
    cached: bool | None = None  # True: from the cache; False: bytes read; None: nothing read


@dataclasses.dataclass(frozen=True)
class ProbeSpec:
    """How photos are judged: limits of references (read whole) and of restore photos (header)."""

    limits: ImageLimits
    restore_limits: ImageLimits
    storage_options: dict[str, Any] | None = None
    threads: int = 8

    def tag(self, role: str) -> str:
        """The cache's ``limits`` value of a role: how the photo was read and under which limits."""
        if role == "restore":
            return "header:" + _limits_digest(self.restore_limits)
        return "full:" + _limits_digest(self.limits)

    def tags(self, roles: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
        """:meth:`tag` of each of ``roles``, as a column."""
        return pc.if_else(pc.equal(roles, "restore"), self.tag("restore"), self.tag("ref"))


def _limits_digest(limits: ImageLimits) -> str:
    text = f"{limits.max_bytes}/{limits.max_pixels}/{limits.min_side}/{','.join(sorted(limits.formats))}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_version(info: Mapping[str, Any]) -> str | None:
    """A value that changes when the file's bytes change, from ``fs.info`` (None: unknown)."""
    for key in ("ETag", "etag", "md5Hash", "md5", "generation", "version_id", "VersionId"):
        if info.get(key):
            return f"{key}={info[key]}"
    for key in MTIME_KEYS:
        if info.get(key) is not None:
            return f"{key}={info[key]}"
    return None


def _unreadable(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "unreadable: file not found"
    if isinstance(exc, PermissionError):
        return "unreadable: permission denied"
    if isinstance(exc, IsADirectoryError):
        return "unreadable: is a directory"
    text = " ".join(str(exc).split())[:200]
    kind = type(exc).__name__
    return f"unreadable: {kind}: {text}" if text else f"unreadable: {kind}"


def probe_uri(
    uri: str,
    limits: ImageLimits,
    *,
    header_only: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    cached: Mapping[str, Any] | None = None,
) -> Probe:
    """Probe one photo (see the module docstring); ``cached``: its cache row, if any."""
    try:
        fs, path = url_to_fs(uri, storage_options)
        info = fs.info(path)
        if info.get("type") == "directory":
            raise IsADirectoryError(path)
        size = int(info["size"]) if info.get("size") is not None else None
        version = file_version(info)
    except Exception as exc:
        return Probe(stage="read", reason=_unreadable(exc))
    if (
        cached is not None
        and version is not None
        and cached["version"] == version
        and cached["size"] == size
    ):
        return Probe(**{k: cached[k] for k in ("sha256", "width", "height", "stage", "reason")},
                     size=size, version=version, cached=True)
    try:
        if size is not None:
            check_size(size, limits)
        want = limits.max_bytes + 1
        if header_only and (size is None or size > HEADER_BYTES):
            want = HEADER_BYTES
        with fs.open(path, "rb") as fh:
            data = fh.read(want)
    except PFStorerError as exc:
        return Probe(stage="image", reason=str(exc), size=size, version=version, cached=False)
    except Exception as exc:
        return Probe(stage="read", reason=_unreadable(exc))
    try:
        if header_only:
            try:
                height, width = probe_header(data, limits=limits)
            except PFStorerError:
                if len(data) != want or want > limits.max_bytes:
                    raise  # the whole file was read: the header is broken
                with fs.open(path, "rb") as fh:  # a header longer than HEADER_BYTES
                    data = fh.read(limits.max_bytes + 1)
                height, width = probe_header(data, limits=limits)
            return Probe(None, width, height, size=size, version=version, cached=False)
        width, height = decode_photo(data, limits=limits).size
    except PFStorerError as exc:
        return Probe(stage="image", reason=str(exc), size=size, version=version, cached=False)
    except Exception as exc:
        return Probe(stage="read", reason=_unreadable(exc))
    sha = hashlib.sha256(data).hexdigest()
    return Probe(sha, width, height, size=size, version=version, cached=False)


def probe_many(
    wanted: Iterable[tuple[str, str]],
    spec: ProbeSpec,
    cache: ProbeCache | None = None,
) -> dict[tuple[str, str], Probe]:
    """Probe each ``(uri, role)`` once, ``spec.threads`` at a time (photos are I/O first)."""
    keys = list(dict.fromkeys(wanted))

    def one(key: tuple[str, str]) -> Probe:
        uri, role = key
        hit = cache.get(uri, spec.tag(role)) if cache is not None else None
        limits = spec.restore_limits if role == "restore" else spec.limits
        return probe_uri(uri, limits, header_only=role == "restore",
                         storage_options=spec.storage_options, cached=hit)

    if len(keys) <= 1:
        return {k: one(k) for k in keys}
    with ThreadPoolExecutor(max_workers=max(1, min(spec.threads, len(keys)))) as pool:
        return dict(zip(keys, pool.map(one, keys), strict=True))


def probe_photos(photos: pa.Table, spec: ProbeSpec, cache: ProbeCache | None = None) -> pa.Table:
    """:data:`PROBE_SCHEMA` rows of ``photos`` (columns ``uri``, ``role``; distinct), probed one by
    one (:func:`probe_many`): what runs where photos are read, for the photos a listing did not
    vouch for."""
    keys = list(zip(photos.column("uri").to_pylist(), photos.column("role").to_pylist(), strict=True))
    found = probe_many(keys, spec, cache)
    probes = [found[k] for k in keys]
    columns: dict[str, list[Any]] = {"uri": [k[0] for k in keys], "role": [k[1] for k in keys]}
    for name in PROBE_SCHEMA.names[2:]:
        columns[name] = [getattr(p, name) for p in probes]
    return pa.Table.from_pydict(columns, schema=PROBE_SCHEMA)


#: A folder holding at least this many of a manifest's photo folders is listed once, recursively,
#: rather than each of them apart (:func:`list_versions`).
BULK_FOLDERS = 10


def listing_plan(uris: pa.Array | pa.ChunkedArray) -> list[tuple[str, bool]]:
    """The listings that cover the folders of ``uris``: ``(folder, recursive)`` pairs.

    The rule: photo folders are grouped by their parent; a parent holding at least
    :data:`BULK_FOLDERS` of them is listed once, recursively (``find``: on S3 one ListObjectsV2
    per 1,000 keys under it, however many folders), and every other folder on its own (``ls``).
    So ``bucket/photos/000/p000001/00.jpg`` and its 999 neighbour people cost one paginated
    listing of ``bucket/photos/000``, while a few scattered folders never list their parents'
    unrelated keys. A bucket or a file system's root is never listed recursively.
    """
    folders = pc.unique(_parent(uris.filter(_in_a_folder(uris))))
    has_parent = _in_a_folder(folders)
    counts = pc.value_counts(_parent(folders.filter(has_parent)))
    bulk = counts.field("values").filter(pc.greater_equal(counts.field("counts"), BULK_FOLDERS))
    alone = folders.filter(pc.invert(pc.and_(has_parent, pc.is_in(_parent(folders), value_set=bulk))))
    return [(f, True) for f in bulk.to_pylist()] + [(f, False) for f in alone.to_pylist()]


def _in_a_folder(paths: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Whether each path has a folder to list: not a bucket, a file system's root or a bare name."""
    return pc.match_substring_regex(paths, r"[^/:]/[^/]+$")


def _parent(paths: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    return pc.replace_substring_regex(paths, r"/[^/]+$", "")


def list_versions(
    uris: pa.Array | pa.ChunkedArray,
    storage_options: Mapping[str, Any] | None = None,
    threads: int = 8,
) -> pa.Table:
    """``uri``, ``size``, ``version`` of every file in the folders of ``uris``, listed in bulk
    (:func:`listing_plan`) instead of one ``info`` per photo.

    URIs are rebuilt from the listed folder as the manifest spells it, so they equal the
    manifest's; files outside the photos' folders (a recursive listing's other keys) are dropped.
    A folder that cannot be listed adds nothing: its photos are then probed one by one, which
    says why a missing one fails.
    """
    systems: dict[str, Any] = {}  # protocol -> filesystem, resolved once, not once per folder

    def one(root: str, recursive: bool) -> list[tuple[str, int | None, str | None]]:
        try:
            protocol = fsspec.utils.get_protocol(root)
            if protocol not in systems:
                systems[protocol] = url_to_fs(root, storage_options)[0]
            fs, path = systems[protocol], fsspec.core.strip_protocol(root)
            if recursive:  # names below path, spelled from root
                entries = fs.find(path, detail=True).values()
                named = [(root + e["name"][len(path):], e) for e in entries if e["name"].startswith(path + "/")]
            else:  # names in path
                entries = fs.ls(path, detail=True, refresh=True)
                named = [(f"{root}/{e['name'].rsplit('/', 1)[-1]}", e) for e in entries]
        except Exception:
            return []
        return [(uri, e.get("size"), file_version(e)) for uri, e in named if e.get("type") == "file"]

    plan = listing_plan(uris)
    if all(is_local_url(root) for root, _ in plan):  # Python work: threads would only pass the GIL around
        listed = [one(*unit) for unit in plan]
    else:  # remote listings wait on the network: they overlap
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(plan)))) as pool:
            listed = list(pool.map(lambda unit: one(*unit), plan))
    files = [f for part in listed for f in part]
    uri, size, version = zip(*files) if files else ((), (), ())
    table = pa.table(
        {
            "uri": pa.array(uri, pa.string()),
            "size": pa.array(size, pa.int64()),
            "version": pa.array(version, pa.string()),
        }
    )
    folders = pc.unique(_parent(uris))
    return table.filter(pc.is_in(_parent(table.column("uri")), value_set=folders))


def known_probes(photos: pa.Table, spec: ProbeSpec, cache: ProbeCache | None) -> tuple[pa.Table, pa.Table]:
    """``(known, unknown)``: :data:`PROBE_SCHEMA` rows of the ``photos`` (``uri``, ``role``)
    whose listed size and version equal their cache row's, untouched, and the other photos, to
    probe. The listing (:func:`list_versions`) meets the cache in an Arrow join, not row by row."""
    if cache is None or not len(cache) or not photos.num_rows:
        return PROBE_SCHEMA.empty_table(), photos
    listed = list_versions(photos.column("uri"), spec.storage_options, spec.threads)
    at = pc.index_in(photos.column("uri"), value_set=listed.column("uri"))
    keys = pa.table(
        {
            "uri": photos.column("uri"),
            "limits": spec.tags(photos.column("role")),
            "size": listed.column("size").take(at),
            "version": listed.column("version").take(at),
        }
    )
    rows = cache.lookup(keys)
    hit = pc.is_valid(rows.column("uri"))
    known = pa.table(
        {
            "uri": photos.column("uri"),
            "role": photos.column("role"),
            **{name: rows.column(name) for name in (*_RESULT, "size", "version")},
            "cached": pa.repeat(True, photos.num_rows),
        }
    ).filter(hit)
    return known.cast(PROBE_SCHEMA), photos.filter(pc.invert(hit))


class ProbeCache:
    """Earlier probes, ``(uri, limits tag)`` -> cache row, kept as one Parquet file at any URL."""

    def __init__(self, table: pa.Table | None = None) -> None:
        self.table = CACHE_SCHEMA.empty_table() if table is None else table.select(CACHE_SCHEMA.names)
        self._rows: dict[tuple[str, str], int] | None = None

    def __len__(self) -> int:
        return self.table.num_rows

    def get(self, uri: str, tag: str) -> dict[str, Any] | None:
        if self._rows is None:  # built on first use, once per process
            self._rows = {
                key: i
                for i, key in enumerate(
                    zip(self.table.column("uri").to_pylist(), self.table.column("limits").to_pylist(), strict=True)
                )
            }
        i = self._rows.get((uri, tag))
        return None if i is None else self.table.slice(i, 1).to_pylist()[0]

    def lookup(self, keys: pa.Table) -> pa.Table:
        """The cache row (:data:`CACHE_SCHEMA`) of each row of ``keys`` whose ``uri``, ``limits``,
        ``size`` and ``version`` all equal it, a row of nulls for the others (an unknown version
        never matches)."""
        at = pc.index_in(_cache_key(keys), value_set=_cache_key(self.table), skip_nulls=True)
        return self.table.take(at)

    @classmethod
    def read(cls, url: str | None, storage_options: Mapping[str, Any] | None = None) -> ProbeCache:
        """The cache at ``url``; empty when absent or unreadable (a cache is never needed)."""
        if not url:
            return cls()
        try:
            fs, path = url_to_fs(url, storage_options)
            if not fs.exists(path):
                return cls()
            table = pq.read_table(pa.py_buffer(fs.cat_file(path)))  # one read, not a seek per page
            return cls(table.cast(CACHE_SCHEMA))
        except Exception:
            return cls()

    def merged(self, new: pa.Table) -> ProbeCache:
        """This cache with ``new`` rows (CACHE_SCHEMA) replacing those of the same key."""
        new = new.cast(CACHE_SCHEMA)
        if not self.table.num_rows:
            return ProbeCache(new)
        sep = "\x00"
        old_keys = pc.binary_join_element_wise(self.table["uri"], self.table["limits"], sep)
        new_keys = pc.binary_join_element_wise(new["uri"], new["limits"], sep)
        keep = self.table.filter(pc.invert(pc.is_in(old_keys, value_set=new_keys)))
        return ProbeCache(pa.concat_tables([keep, new]))

    def write(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        """Replace the file at ``url`` in one write (a reader sees the old cache or the new)."""
        fs, path = url_to_fs(url, storage_options)
        buf = io.BytesIO()
        pq.write_table(self.table, buf)
        if is_local_url(url):
            parent = str(PurePosixPath(path).parent)
            fs.makedirs(parent, exist_ok=True)
            tmp = f"{path}.tmp-{hashlib.sha256(buf.getvalue()).hexdigest()[:8]}"
            fs.pipe_file(tmp, buf.getvalue())
            fs.mv(tmp, path)
        else:
            fs.pipe_file(path, buf.getvalue())


def _cache_key(table: pa.Table) -> pa.ChunkedArray:
    """One string per row that is equal where ``uri``, ``limits``, ``size`` and ``version`` all
    are (null where any is null)."""
    size = pc.cast(table.column("size"), pa.string())
    return pc.binary_join_element_wise(
        table.column("uri"), table.column("limits"), size, table.column("version"), "\x00"
    )
