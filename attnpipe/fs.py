"""Filesystems for every path attnpipe reads or writes: the one place a path or URI becomes (filesystem, path).

A plain path is the local filesystem; ``file://``, ``s3://``, ``gs://``, ``abfs://``, ``hdfs://`` go through pyarrow.
For ``s3://`` the standard AWS environment is honoured the way boto3 and the AWS CLI honour it — pyarrow does not
read ``AWS_ENDPOINT_URL`` on its own — and pyarrow's URI query parameters (``?endpoint_override=host:port&scheme=http``)
win over the environment. Query parameters stay attached to a URI when it is joined (``join``), so a dataset URI
with them keeps working for every file below it.

Writes are made atomic per object: on a local disk a file is written to a temporary name, fsynced and renamed; on an
object store one PUT is atomic by itself (readers see the old or the new object, never half of one).

Example::

    fs, path = resolve("s3://bucket/emb?endpoint_override=127.0.0.1:8333&scheme=http")
    write_bytes(join("s3://bucket/emb", "_manifest.json"), b"{}")
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

T = TypeVar("T")
AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_TRANSIENT_TRIES = 5


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs (rename-based publishing is available)."""
    return "://" not in uri or uri.startswith("file://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a local path or a URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(parts.path)
    if parts.scheme == "s3":
        query = dict(parse_qsl(parts.query))
        return _s3(tuple(sorted(query.items())), _aws_env()), f"{parts.netloc}{parts.path}".rstrip("/")
    return pafs.FileSystem.from_uri(uri)


def _aws_env() -> tuple[tuple[str, str], ...]:
    return tuple((k, os.environ[k]) for k in AWS_ENV if os.environ.get(k))


@functools.lru_cache(maxsize=32)
def _s3(query: tuple[tuple[str, str], ...], env: tuple[tuple[str, str], ...]) -> pafs.S3FileSystem:
    """One S3 client per (URI options, AWS environment): URI query parameters > environment > pyarrow defaults."""
    q, e = dict(query), dict(env)
    kwargs: dict[str, Any] = {}
    endpoint = q.get("endpoint_override") or e.get("AWS_ENDPOINT_URL_S3") or e.get("AWS_ENDPOINT_URL")
    if endpoint:
        if "://" in endpoint:  # the AWS form is a URL; pyarrow wants host[:port] and a scheme
            split = urlsplit(endpoint)
            kwargs["scheme"], endpoint = split.scheme, split.netloc
        kwargs["endpoint_override"] = endpoint
    if q.get("scheme"):
        kwargs["scheme"] = q["scheme"]
    region = q.get("region") or e.get("AWS_REGION") or e.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    access, secret = q.get("access_key") or e.get("AWS_ACCESS_KEY_ID"), q.get("secret_key")
    secret = secret or e.get("AWS_SECRET_ACCESS_KEY")
    if access and secret:
        kwargs.update(access_key=access, secret_key=secret)
        token = q.get("session_token") or e.get("AWS_SESSION_TOKEN")
        if token:
            kwargs["session_token"] = token
    if q.get("allow_bucket_creation", "").lower() == "true":
        kwargs["allow_bucket_creation"] = True
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=_TRANSIENT_TRIES)
    return pafs.S3FileSystem(**kwargs)


def join(uri: str, *names: str) -> str:
    """``uri`` / ``names``, keeping a URI's query parameters at the end."""
    base, sep, query = uri.partition("?") if "://" in uri else (uri, "", "")
    for name in names:
        base = f"{base.rstrip('/')}/{name}" if base else name
    return f"{base}{sep}{query}"


def parent(uri: str) -> str:
    base, sep, query = uri.partition("?") if "://" in uri else (uri, "", "")
    if "://" not in base:
        return f"{os.path.dirname(os.path.abspath(base))}"
    return f"{base.rstrip('/').rsplit('/', 1)[0]}{sep}{query}"


def basename(uri: str) -> str:
    base = uri.partition("?")[0] if "://" in uri else uri
    return base.rstrip("/").rsplit("/", 1)[-1]


def display(uri: str) -> str:
    """A URI as users typed it, without query parameters (which may carry keys)."""
    if "://" not in uri:
        return os.path.abspath(uri)
    return uri.partition("?")[0]


def info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    return retry(lambda: fs.get_file_info(path))


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    return info(uri).type == pafs.FileType.File


def is_dir(uri: str) -> bool:
    """A directory, or an object-store prefix with something below it."""
    i = info(uri)
    if i.type == pafs.FileType.Directory:
        return True
    if i.type == pafs.FileType.NotFound and not is_local(uri):
        return bool(listdir(uri))
    return False


def listdir(uri: str) -> list[str]:
    """Names directly under ``uri`` (files and directories), sorted; [] when it does not exist."""
    fs, path = resolve(uri)
    sel = pafs.FileSelector(path, allow_not_found=True)
    try:
        infos = retry(lambda: fs.get_file_info(sel))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(i.base_name for i in infos)


def walk_files(uri: str) -> list[tuple[str, int]]:
    """(relative path, size) of every file below ``uri``, sorted."""
    fs, path = resolve(uri)
    sel = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    prefix = path.rstrip("/") + "/"
    infos = retry(lambda: fs.get_file_info(sel))
    return sorted((i.path[len(prefix) :], i.size) for i in infos if i.type == pafs.FileType.File)


def makedirs(uri: str) -> None:
    """Create a directory (a no-op on object stores, where prefixes need no creation)."""
    _fs, path = resolve(uri)
    if is_local(uri):
        os.makedirs(path, exist_ok=True)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return retry(read)


def read_buffer(uri: str) -> pa.Buffer:
    """The whole object as an Arrow buffer (one GET; zero-copy input for Parquet readers)."""
    fs, path = resolve(uri)

    def read() -> pa.Buffer:
        with fs.open_input_file(path) as f:
            return f.read_buffer()

    return retry(read)


def read_text(uri: str) -> str:
    """UTF-8 text of a small object.

    Raises:
        ValueError: the object is not UTF-8 (named in the message).
    """
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{display(uri)} is not UTF-8 text ({len(data)} bytes): damaged") from None


def read_json(uri: str) -> Any:
    """Parsed JSON of a small object.

    Raises:
        ValueError: not UTF-8 or not JSON (the message names the file).
    """
    text = read_text(uri)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{display(uri)} is not valid JSON ({exc}): damaged") from None


def write_bytes(uri: str, data: bytes | pa.Buffer) -> None:
    """Write one object atomically: local = temp + fsync + rename; object store = one PUT."""
    fs, path = resolve(uri)
    if is_local(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return

    def put() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    retry(put)


def write_json(uri: str, obj: Any) -> bytes:
    """Write JSON atomically; returns the bytes written (to checksum a commit point)."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    write_bytes(uri, data)
    return data


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        retry(lambda: fs.delete_file(path))
    except FileNotFoundError:
        pass


def delete_dir(uri: str) -> None:
    """Delete a directory/prefix and everything below it (only ever called on paths attnpipe wrote)."""
    fs, path = resolve(uri)
    try:
        retry(lambda: fs.delete_dir(path))
    except FileNotFoundError:
        pass


def upload_dir(local: str, uri: str) -> list[str]:
    """Copy every file of a local directory to ``uri`` (relative layout kept); returns the relative paths."""
    rels = []
    for base, _, files in os.walk(local):
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(base, name), local).replace(os.sep, "/")
            with open(os.path.join(base, name), "rb") as f:
                write_bytes(join(uri, rel), f.read())
            rels.append(rel)
    return sorted(rels)


def download(uri: str, local: str) -> None:
    """Copy one object to a local file (atomically)."""
    fs, path = resolve(uri)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp-{uuid.uuid4().hex[:8]}"

    def copy() -> None:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
            dst.writelines(iter(lambda: src.read(1 << 22), b""))

    retry(copy)
    os.replace(tmp, local)


def sha256_bytes(data: bytes | pa.Buffer) -> str:
    return hashlib.sha256(memoryview(data)).hexdigest()


def sha256_file(uri: str) -> str:
    """Hex sha256 of a file or object, streamed in 1 MiB chunks."""
    fs, path = resolve(uri)
    h = hashlib.sha256()

    def read() -> None:
        with fs.open_input_stream(path) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)

    retry(read)
    return h.hexdigest()


def retry(call: Callable[[], T], tries: int = _TRANSIENT_TRIES, first_wait_s: float = 0.5) -> T:
    """Run an I/O call, retrying transient errors (connection refused/reset, timeouts, 5xx) with backoff.

    Missing files and permission errors are not transient and are raised at once.
    """
    for attempt in range(tries):
        try:
            return call()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError):
            raise
        except OSError as exc:
            if attempt == tries - 1 or not _transient(exc):
                raise
            time.sleep(first_wait_s * 2**attempt)
    raise AssertionError("unreachable")


def _transient(exc: OSError) -> bool:
    text = str(exc).lower()
    signals = ("connection", "timed out", "timeout", "reset", "refused", "503", "500", "502", "504", "slow down")
    return any(s in text for s in signals) or "curl" in text


def cache_dir(kind: str, key: str) -> str:
    """This machine's cache folder for ``key`` (a URI): ``$ATTNPIPE_CACHE`` or ``~/.cache/attnpipe``, by kind."""
    base = os.environ.get("ATTNPIPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "attnpipe")
    return os.path.join(base, kind, hashlib.sha256(key.encode()).hexdigest()[:16])


def local_copy(uri: str, siblings: tuple[str, ...] = ()) -> str:
    """A local path holding the file ``uri`` (itself when local; else a cached download, refreshed when the
    object's size or mtime changes). Libraries that need a real file (torch, safetensors) read this.

    ``siblings`` are suffix replacements fetched beside it when they exist (e.g. ``(".json",)`` for a weights
    file's sidecar: ``head.safetensors`` -> ``head.json``).
    """
    if is_local(uri):
        return resolve(uri)[1]
    folder = cache_dir("files", parent(uri))
    local = os.path.join(folder, basename(uri))
    for src, dst in [(uri, local)] + [(_with_suffix(uri, s), _with_suffix(local, s)) for s in siblings]:
        meta = info(src)
        if meta.type != pafs.FileType.File:
            continue
        stamp = f"{meta.size}:{meta.mtime_ns}"
        if not os.path.isfile(dst) or _read_stamp(dst) != stamp:
            download(src, dst)
            with open(f"{dst}.stamp", "w") as f:
                f.write(stamp)
    return local


def _with_suffix(uri: str, suffix: str) -> str:
    base, sep, query = uri.partition("?") if "://" in uri else (uri, "", "")
    return f"{os.path.splitext(base)[0]}{suffix}{sep}{query}"


def _read_stamp(path: str) -> str:
    try:
        with open(f"{path}.stamp") as f:
            return f.read()
    except OSError:
        return ""
