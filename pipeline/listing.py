"""List INPUT into the manifest: one row per input image, sorted by uri, de-duplicated.

The manifest is the first step of a shard's journey (list -> plan -> decode -> infer ->
refine -> encode -> commit). Its `key` column is the input half of every result's
fingerprint, so it must be cheap and must change whenever the bytes may have changed:
`<size>-<version>` by default (version = ETag on object stores, mtime in ns on local
disk), or `sha256:<hex>` of the bytes with `content_hash=True`, for stores where copies
and re-uploads change versions of identical files.

A listed input is never dropped. A manifest entry that does not exist keeps its row with
null size, version and key; the engine turns it into an "unreadable path" error row.
Directory and glob listings keep only image files, since there the user did not name
each file.

Manifests of a million entries are handled column-wise with pyarrow: Python loops run per
distinct parent directory (one `ls` each, instead of a stat per file), not per entry.
"""

from __future__ import annotations

import hashlib
import posixpath
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from segflow.errors import ConfigError, InputError
from segflow.pipeline.storage import filesystem_for, redact, to_uri, with_retries

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MANIFEST_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("size", pa.int64()),  # bytes; null when the entry does not exist
    pa.field("version", pa.string()),  # ETag, or mtime in ns; null when unknown
    pa.field("key", pa.string()),  # content key; null when the entry does not exist
])
ACCEPTED_FORMS = (
    "a directory (searched recursively), a glob such as 'dir/**/*.png', an image file, a .txt file "
    "with one URI per line, or a .parquet file with a 'uri' column; as a local path or any fsspec URL "
    "(file://, s3://, gs://, memory://, ...)"
)
# Columns a .parquet manifest may carry as the version, in order of preference. With `size`
# and one of these present, nothing is stat-ed: the fast path for huge manifests.
VERSION_COLUMNS = ("version", "etag", "mtime")
IO_THREADS = 16  # parallel `ls` / hash reads: they wait on storage, not on the CPU

_STATS_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("version", pa.string())])
_PROBE = "segflow-probe-name"


def list_inputs(input: str, storage_options: dict | None = None, content_hash: bool = False) -> pa.Table:
    """The manifest of INPUT: a table with MANIFEST_SCHEMA, sorted by uri, one row per uri.

    INPUT is one of ACCEPTED_FORMS. Relative entries in a .txt or .parquet manifest are
    resolved against the manifest's own folder, so a manifest can travel with its images.
    Raises InputError when INPUT is missing, unreadable, or holds no images.
    """
    fs, path = _resolve_input(input, storage_options)
    fs.invalidate_cache()  # a listing cached earlier in this process may be stale
    if any(c in path for c in "*?["):
        found = with_retries(fs.glob, path, detail=True, what=input)
        stats = _table_from_infos(fs, [i for i in found.values() if _is_image_file(i)])
    else:
        info = _info(fs, path, input)
        suffix = posixpath.splitext(path)[1].lower()
        if info.get("type") == "directory" and isinstance(fs, LocalFileSystem):
            stats = _table_from_infos(fs, [i for i in _walk_local(fs, fs._strip_protocol(path)) if _is_image_file(i)])
        elif info.get("type") == "directory":
            found = with_retries(fs.find, path, detail=True, withdirs=False, what=input)
            stats = _table_from_infos(fs, [i for i in found.values() if _is_image_file(i)])
        elif suffix == ".txt":
            stats = _stat_entries(_read_txt_manifest(fs, path, input), fs, posixpath.dirname(path), storage_options)
        elif suffix == ".parquet":
            stats = _read_parquet_manifest(fs, path, input, storage_options)
        elif suffix in IMAGE_EXTENSIONS:
            stats = _table_from_infos(fs, [info])
        else:
            raise InputError(f"{redact(input)}: not an image, .txt or .parquet file; INPUT must be {ACCEPTED_FORMS}")

    manifest = _sorted_unique(stats)
    if manifest.num_rows == 0:
        raise InputError(
            f"{redact(input)}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, any case; "
            f"names starting with '.' are skipped) or the manifest lists no URIs; INPUT must be {ACCEPTED_FORMS}"
        )
    keys = _hash_keys(manifest, storage_options) if content_hash else _stat_keys(manifest)
    return manifest.append_column("key", keys).cast(MANIFEST_SCHEMA)


def check_input(input: str, storage_options: dict | None = None) -> None:
    """Fail fast, before any job machinery starts, when INPUT does not exist or cannot be read."""
    fs, path = _resolve_input(input, storage_options)
    if not any(c in path for c in "*?["):
        info = _info(fs, path, input)
        if info.get("type") == "directory" and not with_retries(fs.ls, path, detail=False, what=input):
            raise InputError(f"{redact(input)}: an empty folder, no images to process; INPUT must be {ACCEPTED_FORMS}")


# --- INPUT forms -----------------------------------------------------------------------


def _resolve_input(input: str, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return filesystem_for(input, storage_options)
    except ConfigError as e:
        raise InputError(str(e)) from None  # already names the URL and what to use instead


def _info(fs: fsspec.AbstractFileSystem, path: str, input: str) -> dict:
    try:
        return with_retries(fs.info, path, what=input)
    except FileNotFoundError:
        raise InputError(f"{redact(input)}: does not exist; INPUT must be {ACCEPTED_FORMS}") from None
    except PermissionError:
        raise InputError(f"{redact(input)}: permission denied; check the credentials for this location") from None


def _read_txt_manifest(fs: fsspec.AbstractFileSystem, path: str, input: str) -> pa.Array:
    """Entries of a .txt manifest: one per non-blank line, `#` comment lines skipped."""
    data = with_retries(fs.cat_file, path, what=input)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{redact(input)}: not UTF-8 text (bad byte at offset {e.start}); "
                         "a .txt manifest lists one URI per line") from None
    lines = pc.split_pattern(pa.array([text], pa.large_string()), "\n").flatten()
    lines = pc.utf8_trim_whitespace(lines)  # also drops the \r of CRLF files
    return lines.filter(pc.and_(pc.not_equal(lines, ""), pc.invert(pc.starts_with(lines, "#"))))


def _read_parquet_manifest(fs, path: str, input: str, storage_options: dict | None) -> pa.Table:
    """Entries of a .parquet manifest; its own size/version columns are trusted when present."""
    data = with_retries(fs.cat_file, path, what=input)
    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{redact(input)}: not a readable Parquet file ({redact(str(e))})") from None
    columns = parquet.schema_arrow.names
    if "uri" not in columns:
        raise InputError(f"{redact(input)}: a .parquet manifest needs a 'uri' column; it has {columns}")
    version = next((c for c in VERSION_COLUMNS if c in columns), None)
    fast = "size" in columns and version is not None
    table = parquet.read(columns=["uri", "size", version] if fast else ["uri"])
    uri = pc.utf8_trim_whitespace(table["uri"].cast(pa.large_string()))
    keep = pc.and_(pc.is_valid(uri), pc.not_equal(pc.fill_null(uri, ""), ""))
    entries = uri.filter(keep).combine_chunks()
    if not fast:
        return _stat_entries(entries, fs, posixpath.dirname(path), storage_options)
    uris, _ = _canonical_uris(entries, fs, posixpath.dirname(path), storage_options)
    return pa.table({
        "uri": uris,
        "size": table["size"].filter(keep).cast(pa.int64()),
        "version": _version_column(table[version].filter(keep)),
    })


# --- stats for listed entries ----------------------------------------------------------


def _stat_entries(entries: pa.Array, base_fs, base_dir: str, storage_options: dict | None) -> pa.Table:
    """uri/size/version for manifest entries, listing each parent directory once.

    Entries that do not exist (or whose directory cannot be listed) get null size/version.
    """
    uris, directories = _canonical_uris(entries, base_fs, base_dir, storage_options)
    workers = max(1, min(IO_THREADS, len(directories)))
    with ThreadPoolExecutor(workers) as pool:
        listed = list(pool.map(lambda d: _list_directory(*d), directories))
    stats = pa.concat_tables([_STATS_SCHEMA.empty_table(), *listed])
    return pa.table({"uri": uris.cast(pa.string())}).join(stats, "uri", join_type="left outer")


def _list_directory(fs: fsspec.AbstractFileSystem, directory: str) -> pa.Table:
    fs.invalidate_cache(directory)
    try:
        infos = with_retries(fs.ls, directory, detail=True, what=to_uri(fs, directory))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return _STATS_SCHEMA.empty_table()  # its entries keep null stats and become error rows
    return _table_from_infos(fs, [i for i in infos if i.get("type") == "file"])


def _canonical_uris(entries: pa.Array, base_fs, base_dir: str, storage_options: dict | None):
    """(to_uri of every entry, the distinct (fs, directory) pairs they live in).

    Splits each entry into parent + name with one regex over the column, resolves each
    distinct parent once, and joins the canonical parent prefix back onto the names.
    Entries whose parent cannot be resolved (unknown protocol) are kept verbatim.
    """
    parts = pc.extract_regex(entries, r"^(?P<parent>.*/)(?P<name>[^/]+)$")
    parent = pc.fill_null(pc.struct_field(parts, "parent"), "")
    name = pc.if_else(pc.is_valid(parts), pc.struct_field(parts, "name"), entries)
    encoded = pc.dictionary_encode(parent)
    resolve = _ParentResolver(base_fs, base_dir, storage_options)
    prefixes, directories = [], {}
    for raw in encoded.dictionary.to_pylist():
        resolved = resolve(raw)
        if resolved is None:
            prefixes.append(raw)
        else:
            fs, directory, prefix = resolved
            prefixes.append(prefix)
            directories[(id(fs), directory)] = (fs, directory)
    prefix = pc.take(pa.array(prefixes, pa.large_string()), encoded.indices)
    return pc.binary_join_element_wise(prefix, name, pa.scalar("", pa.large_string())), list(directories.values())


class _ParentResolver:
    """Maps a parent string from a manifest to (fs, directory, canonical uri prefix).

    Absolute local paths and URLs stand alone; relative parents hang off the manifest's
    folder. One filesystem per protocol is reused, which keeps a million-entry manifest in
    a million directories at microseconds per directory.
    """

    def __init__(self, base_fs, base_dir: str, storage_options: dict | None):
        self.base_fs, self.base_dir, self.storage_options = base_fs, base_dir, storage_options
        self.by_protocol: dict[str, fsspec.AbstractFileSystem] = {}

    def __call__(self, parent: str):
        if "://" in parent or "::" in parent:
            protocol = parent.split("://", 1)[0]
            fs = self.by_protocol.get(protocol)
            if fs is None:
                try:
                    fs, _ = filesystem_for(parent, self.storage_options)
                except ConfigError as e:
                    if protocol.split("::")[-1] in fsspec.available_protocols():
                        raise InputError(f"manifest entries under {redact(parent)}: {e}") from None
                    return None  # unknown protocol: the entry stays, as an unreadable path
                if "::" not in parent:
                    self.by_protocol[protocol] = fs
            directory = fs._strip_protocol(parent)
        elif parent.startswith("/"):
            fs = self.base_fs if isinstance(self.base_fs, LocalFileSystem) else LocalFileSystem()
            directory = parent
        else:
            fs, directory = self.base_fs, posixpath.join(self.base_dir, parent)
        directory = fs._strip_protocol(posixpath.normpath(directory)) if directory else directory
        probe = to_uri(fs, posixpath.join(directory, _PROBE) if directory else _PROBE)
        if not probe.endswith(_PROBE):
            return None
        return fs, directory, probe[: -len(_PROBE)]


def _walk_local(fs: LocalFileSystem, root: str) -> list[dict]:
    """Info of every file under a local folder, following symlinked files and folders.

    fsspec's `find` reports a symlink as type "other" and does not descend into a linked
    folder, so a folder of symlinks (a common way to pick a subset of a dataset) listed as
    empty. Here each real folder is entered once, by its (device, inode), so a link to an
    ancestor cannot loop; entries are visited in name order, so the same tree always gives
    the same URIs (a file's `uri` is its path under INPUT, link names included). A link
    whose target is missing (or a loop of links) is kept with no size: it becomes the
    image's "unreadable path" error row (storage.read_bytes) instead of vanishing.
    """
    import os

    infos, seen, stack = [], set(), [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError:  # vanished or unreadable since it was found: nothing to list there
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        for entry in entries:
            path = os.path.join(folder, entry.name)
            try:
                is_folder = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_folder = False
            if is_folder:
                stack.append(path)
                continue
            try:
                infos.append(fs.info(path))
            except OSError:  # a dangling link, or a loop of links
                infos.append({"name": path, "type": "file", "size": None, "islink": entry.is_symlink()})
    return infos


# --- columns ------------------------------------------------------------------------------


def _table_from_infos(fs: fsspec.AbstractFileSystem, infos: list[dict]) -> pa.Table:
    names = [i["name"] for i in infos]
    return pa.table({
        "uri": _uris(fs, names),
        "size": pa.array([i.get("size") for i in infos], pa.int64()),
        "version": pa.array([_version_of(i) for i in infos], pa.string()),
    }, schema=_STATS_SCHEMA)


def _uris(fs: fsspec.AbstractFileSystem, names: list[str]) -> pa.Array:
    """to_uri of names an fs returned, as one prefix join when the store allows it."""
    if not names:
        return pa.array([], pa.string())
    first = to_uri(fs, names[0])
    if first.endswith(names[0]):
        return pc.binary_join_element_wise(first[: len(first) - len(names[0])], pa.array(names, pa.string()), "")
    return pa.array([to_uri(fs, n) for n in names], pa.string())


def _version_of(info: dict) -> str | None:
    """ETag where the store has one (quotes stripped), else a modification time in ns."""
    for field in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, str):
            return value.strip('"')
        if isinstance(value, datetime):
            value = value.timestamp()
        return str(round(float(value) * 1e9))  # seconds -> ns, rounded as pc.round does
    return None


def _version_column(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A manifest's version/etag/mtime column as strings, matching `_version_of`.

    Timestamps and float seconds become integer ns; integers are taken as ns already.
    """
    kind = column.type
    if pa.types.is_timestamp(kind):
        column = column.cast(pa.timestamp("ns", tz=kind.tz)).cast(pa.int64())
    elif pa.types.is_floating(kind):
        column = pc.round(pc.multiply(column.cast(pa.float64()), 1e9)).cast(pa.int64())
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pc.utf8_trim(column, '"').cast(pa.string())
    return column.cast(pa.string())


def _sorted_unique(stats: pa.Table) -> pa.Table:
    """Rows sorted by uri (byte order), keeping the first row of each uri."""
    table = stats.cast(_STATS_SCHEMA).sort_by("uri").combine_chunks()
    if table.num_rows < 2:
        return table
    uri = table["uri"].chunk(0)
    first = pc.not_equal(uri.slice(1), uri.slice(0, len(uri) - 1))
    return table.filter(pa.concat_arrays([pa.array([True]), first]))


def _stat_keys(manifest: pa.Table) -> pa.Array:
    # null size (missing entry) -> null key: binary_join emits null when any part is null
    return pc.binary_join_element_wise(
        manifest["size"].cast(pa.string()), pc.fill_null(manifest["version"], ""), "-"
    )


def _hash_keys(manifest: pa.Table, storage_options: dict | None) -> pa.Array:
    """`sha256:<hex>` of each existing entry's bytes, read in 1 MiB blocks; null if unreadable."""

    def digest(uri: str, size: int | None) -> str | None:
        if size is None:
            return None
        fs, path = filesystem_for(uri, storage_options)

        def read() -> str:
            h = hashlib.sha256()
            with fs.open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            return "sha256:" + h.hexdigest()

        try:
            return with_retries(read, what=uri)
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            return None

    with ThreadPoolExecutor(IO_THREADS) as pool:
        keys = pool.map(digest, manifest["uri"].to_pylist(), manifest["size"].to_pylist())
        return pa.array(list(keys), pa.string())


def _is_image_file(info: dict) -> bool:
    name = posixpath.basename(info["name"])
    # "." names: staging files, macOS "._x.jpg" resource forks, editor backups.
    return info.get("type") == "file" and not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
