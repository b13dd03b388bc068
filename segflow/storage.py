"""The one place segflow touches storage: resolve, read, commit, retry, redact.

It lives at the package root, beside errors.py, because every layer needs it: the engine
(as `segflow.pipeline.storage`, the same module object), and models/, which reads and
writes checkpoints through it and may not import the engine (tests/test_imports.py).

Every other module hands a URL (or an already resolved `(fs, path)`) to these functions
and never asks which store it is: fsspec gives local disk, S3, GCS and memory one
interface, and the few places where stores really differ (how a commit is made atomic)
are decided here, once.

Credentials are never taken from `user:secret@` in URLs. They come from the standard
places (environment, AWS profile, instance role) or from `storage_options`, and every
message this module produces goes through `redact`, so a signed URL or a key pasted into
an option does not reach a log or an error message. (A presigned https:// INPUT does keep
its signature in its `uri`: that string is how the file is read.)
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import random
import re
import time
import uuid
from typing import Any, Callable, TypeVar, Union

import fsspec
from fsspec.implementations.local import LocalFileSystem

from segflow.errors import ConfigError, ImageReadError, StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")
Target = Union[str, tuple[fsspec.AbstractFileSystem, str]]  # a URL, or an already resolved (fs, path)

MAX_DELAY_S = 10.0  # cap on one backoff sleep, however many attempts are allowed

# Staging files are `.<name>.<32 hex>.tmp`: the leading dot hides them from
# pyarrow.dataset (it skips names starting with "." or "_"), the uuid keeps concurrent
# writers of the same name apart, and the exact shape lets clean_staging delete only ours.
_STAGING_NAME = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")
_STAGING_NAME_MAX = 100  # keeps `.<name>.<uuid>.tmp` under the usual 255-byte NAME_MAX
# Variables through which the stores' client libraries find endpoints and credentials:
# botocore (AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID, ...), adlfs and azure-identity
# (AZURE_STORAGE_*, AZURE_CLIENT_*, AZURE_TENANT_ID), gcsfs and google-auth.
_STORAGE_ENV = re.compile(r"^(?:AWS_|AZURE_|GCSFS_|GOOGLE_APPLICATION_CREDENTIALS$|GOOGLE_CLOUD_PROJECT$)")


def filesystem_for(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a local path or URL to `(fs, path)` with fsspec's `url_to_fs`.

    Endpoint and credentials: `storage_options` (e.g. `endpoint_url`, `key`, `secret`,
    `client_kwargs`) or the standard places. For S3, botocore (>= 1.31; this environment
    has 1.43) itself reads `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`, `AWS_PROFILE` and the
    credential chain, and aiobotocore inherits that, so nothing here special-cases S3.
    fsspec caches filesystem instances by their options, not by the environment: a process
    that changes `AWS_ENDPOINT_URL` mid-way must call `clear_instance_cache()`.

    Raises ConfigError for an unknown protocol, a missing driver package, or a URL with a
    password in it (fsspec would treat `KEY:SECRET@bucket` as a bucket name and echo it).
    """
    if _USERINFO_WITH_PASSWORD.search(url):
        raise ConfigError(
            f"{redact(url)}: credentials embedded in the URL are not used; pass them through the "
            "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE) or storage_options"
        )
    try:
        fs, path = fsspec.core.url_to_fs(url, **_one_retry_layer(url, storage_options or {}))
    except ImportError as e:
        raise ConfigError(f"{redact(url)}: {redact(str(e))} (pip install s3fs / gcsfs / adlfs as needed)") from None
    except ValueError as e:
        raise ConfigError(
            f"{redact(url)}: {redact(str(e))}; use a local path or a URL fsspec knows "
            "(file://, s3://, gs://, az://, memory://)"
        ) from None
    if fsspec.core.split_protocol(url)[0] in _SINGLE_ATTEMPT:
        fs.retries = 1  # s3fs's own retry loop (timeouts): a class attribute, not an option
    return fs, path


# One retry layer: `with_retries` retries every storage call segflow makes, so the clients'
# own retries are turned off underneath it (botocore's legacy mode alone made 5 attempts per
# call, with up to 8 s waits, and s3fs retries timeouts 5 times). A dead endpoint then costs
# 5 attempts and about 3 s, not 25 attempts and 40 s (bench/dead_endpoint.py, docs/storage.md).
# A caller's own `config_kwargs={"retries": ...}` wins.
_SINGLE_ATTEMPT = {"s3": {"config_kwargs": {"retries": {"total_max_attempts": 1}}}}
_SINGLE_ATTEMPT["s3a"] = _SINGLE_ATTEMPT["s3"]


def _one_retry_layer(url: str, options: dict) -> dict:
    """`options` plus the defaults that leave retrying to `with_retries` for this URL's store."""
    defaults = _SINGLE_ATTEMPT.get(fsspec.core.split_protocol(url)[0] or "file")
    if defaults is None:
        return options
    config = {**defaults["config_kwargs"], **(options.get("config_kwargs") or {})}
    return {**defaults, **options, "config_kwargs": config}


def storage_environment() -> dict[str, str]:
    """This process's storage settings from the environment, for the job's Ray workers.

    A Ray worker inherits the environment of the node process that spawned it, not the
    driver's: on a cluster started before the driver's `export AWS_...` (`ray start`, a
    `--ray-address` cluster, another machine) workers would not see the endpoint, profile
    or credentials the driver listed the inputs with, and every read would fail there.
    The engine hands this dict to its actors and tasks as an argument, through Ray's object
    store, and `use_storage_environment` applies it. It never goes into `runtime_env`
    env_vars: Ray writes runtime envs to its logs (runtime_env_agent.log, "Creating runtime
    env: ...") and shows them in its dashboard.
    """
    return {k: v for k, v in os.environ.items() if _STORAGE_ENV.match(k)}


def use_storage_environment(env: dict[str, str] | None) -> None:
    """In a Ray worker: adopt the driver's storage settings (see `storage_environment`).

    The driver's values win, so every process of a job reads and writes as the same
    identity; variables the driver does not set keep the worker's values (a node's own
    role or web identity). When anything changes, cached filesystem instances are dropped:
    fsspec caches them by their options, not by the environment.
    """
    changed = {k: v for k, v in (env or {}).items() if os.environ.get(k) != v}
    if not changed:
        return
    os.environ.update(changed)
    for implementation in list(fsspec.registry.values()):  # the imported ones
        implementation.clear_instance_cache()


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The canonical identity of a file: what every row's `uri` holds.

    A plain absolute path for local files (what users type and `ls` prints), the
    protocol-qualified URL otherwise (`s3://bucket/key`, `memory:///dir/x.png`), so the same
    file always gets the same string whichever way it was named (`s3a://`, `file://`, `./x`).
    """
    path = fs._strip_protocol(path)
    if isinstance(fs, LocalFileSystem):
        return os.path.normpath(path)  # `a/../x` is x on disk; on S3 it is a literal key, left alone
    return fs.unstrip_protocol(path)


def with_retries(
    fn: Callable[..., T], *args: Any, what: str, attempts: int = 5, base_delay: float = 0.2, **kw: Any
) -> T:
    """Call `fn(*args, **kw)`, retrying transient storage errors with exponential backoff.

    Transient: connection failures and timeouts, HTTP 5xx, 429 and throttling codes
    (SlowDown), and OSErrors that are not about the path itself (see `is_transient`).
    Sleep before retry k (k = 1, 2, ...) is `base_delay * 2**(k-1)`, capped at MAX_DELAY_S,
    with +-50 % jitter so many workers hitting one throttled bucket do not retry in step.
    Anything else propagates at once: retrying a missing file only delays its error row.

    This is the only retry layer: `filesystem_for` turns off s3fs's and botocore's own
    retries underneath it, and neither the flows' tasks nor the engine's shard attempts
    retry a StorageError again (a dead endpoint: 5 attempts, about 3 s, then one line).

    Raises StorageError naming `what` (redacted) and the last cause after `attempts` tries.
    """
    if attempts < 1:
        raise ConfigError(f"with_retries: attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kw)
        except Exception as e:
            if _is_missing_credentials(e):  # about the store, never retried, never a traceback
                raise StorageError(
                    f"{redact(what)}: no credentials for this location ({type(e).__name__}); set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or pass storage_options"
                ) from None
            if not is_transient(e):
                raise
            cause = redact(f"{type(e).__name__}: {e}")
            if attempt == attempts:
                # `from None`: the cause's own text may hold what redact() removed above.
                raise StorageError(
                    f"{redact(what)}: storage still failing after {attempts} attempts (last error: {cause}); "
                    "check that the endpoint is reachable (AWS_ENDPOINT_URL / storage_options endpoint_url) "
                    "and the credentials are valid, then rerun"
                ) from None
            delay = min(MAX_DELAY_S, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            log.warning("%s: transient storage error (%s); retry %d/%d in %.2fs",
                        redact(what), cause, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """All bytes of one input file, with retries.

    A problem with this one path (missing, permission denied, a directory, a malformed URL)
    raises ImageReadError, which the engine records as that image's error row. A storage
    outage that outlives the retries raises StorageError instead: it says nothing about the
    image, so the shard should fail and be retried rather than cache an error row.
    """
    try:
        fs, path = filesystem_for(uri, storage_options)
        return with_retries(fs.cat_file, path, what=uri)
    except StorageError:
        raise
    except FileNotFoundError:
        if isinstance(fs, LocalFileSystem) and os.path.islink(path):
            raise ImageReadError(redact(uri), f"unreadable path: a symlink to {redact(os.readlink(path))}, which does not exist "
                                 "(a dangling link); fix or remove the link") from None
        raise ImageReadError(redact(uri), "not found (listed as an input but gone now, or a wrong path)") from None
    except PermissionError:
        raise ImageReadError(redact(uri), "permission denied; check the credentials for this location") from None
    except (IsADirectoryError, NotADirectoryError):
        raise ImageReadError(redact(uri), "not a file (a directory, or a path through a file)") from None
    except (ConfigError, OSError, ValueError) as e:
        if isinstance(e, OSError) and e.errno == errno.ELOOP:
            raise ImageReadError(redact(uri), "unreadable path: a loop of symlinks; fix or remove the link") from None
        raise ImageReadError(redact(uri), f"cannot read: {redact(_describe(e))}") from None
    except Exception as e:
        if _is_botocore_param_error(e):  # e.g. an invalid bucket name in a manifest entry
            raise ImageReadError(redact(uri), f"cannot read: {redact(_describe(e))}") from None
        if _is_missing_credentials(e):  # about the store, not the image: not an error row
            raise StorageError(
                f"{redact(uri)}: no credentials for this location ({type(e).__name__}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or pass storage_options"
            ) from None
        raise


def commit_file(target: Target, data: bytes, storage_options: dict | None = None) -> str:
    """Write `data` so the file appears complete or not at all; return its `to_uri`.

    Local disk: write `.<name>.<uuid>.tmp` beside the target, fsync, `os.replace` onto the
    name, fsync the directory. The rename is atomic within one directory (a "move" from
    /tmp would be a copy), and the dot name is invisible to `pyarrow.dataset`. A killed
    writer leaves only a staging file, which `clean_staging` removes. Parent directories are
    created.

    Object stores: one `fs.pipe_file`. A PUT is visible only once complete. Above s3fs's
    multipart threshold (2 x 50 MiB chunks for `pipe_file`, and always above 5 GiB) the
    object becomes visible only at CompleteMultipartUpload; a writer killed before then
    leaves no object, only an incomplete upload whose parts S3 bills until aborted, so give
    output buckets an AbortIncompleteMultipartUpload lifecycle rule. (tests/test_storage.py
    kills a writer mid-multipart to check this.) Buckets are never created here.

    Raises StorageError (redacted) when the write fails after retries or cannot succeed.
    """
    fs, path = _resolve(target, storage_options)
    uri = to_uri(fs, path)
    try:
        if isinstance(fs, LocalFileSystem):
            with_retries(_replace_local, fs._strip_protocol(path), data, what=uri)
        else:
            with_retries(fs.pipe_file, path, data, what=uri)
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(
            f"{redact(uri)}: cannot write ({redact(_describe(e))}); check that the bucket or directory exists "
            "and the credentials allow writing (segflow never creates buckets)"
        ) from None
    return uri


def check_writable(output: str, storage_options: dict | None = None) -> None:
    """Fail now, in one line, when OUTPUT cannot be written: before any model or worker starts.

    Local disk: a temporary file in OUTPUT's nearest existing folder (OUTPUT itself is not
    created; permissions are what the write says, root's included). Object stores: a tiny
    probe object under OUTPUT, written and deleted (missing credentials, a missing bucket or a
    read-only policy show here). Raises StorageError.
    """
    import tempfile

    fs, path = filesystem_for(output, storage_options)
    if isinstance(fs, LocalFileSystem):
        folder = fs._strip_protocol(path)
        while not os.path.exists(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
        try:
            if not os.path.isdir(folder):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", folder)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise StorageError(f"{redact(output)}: cannot write OUTPUT here ({folder}: {e.strerror or e}); "
                               "choose another OUTPUT or fix its permissions") from None
        return
    probe = f"{output.rstrip('/')}/_segflow-write-check-{uuid.uuid4().hex}"
    commit_file(probe, b"", storage_options)
    _, probe_path = filesystem_for(probe, storage_options)
    with contextlib.suppress(FileNotFoundError):
        with_retries(fs.rm_file, probe_path, what=probe)


def clean_staging(target: Target, storage_options: dict | None = None, *, recursive: bool = False) -> int:
    """Delete staging files (`.<name>.<uuid>.tmp`) a killed run left in a directory.

    Call it before a run writes into the directory, never while another writer is active
    there: its in-flight staging file would be deleted under it. Returns how many files
    were removed; a missing directory has none.
    """
    fs, path = _resolve(target, storage_options)
    uri = to_uri(fs, path)
    fs.invalidate_cache(path)  # a listing cached earlier in this process may predate the kill
    try:
        if recursive:
            names = with_retries(fs.find, path, what=uri)
        else:
            names = [i["name"] for i in with_retries(fs.ls, path, detail=True, what=uri) if i.get("type") == "file"]
    except (FileNotFoundError, NotADirectoryError):
        return 0
    leftovers = [n for n in names if _STAGING_NAME.match(posixpath.basename(n))]
    for name in leftovers:
        with contextlib.suppress(FileNotFoundError):  # another cleaner got there first
            with_retries(fs.rm_file, name, what=to_uri(fs, name))
    if leftovers:
        log.info("%s: removed %d staging file(s) left by an interrupted run", redact(uri), len(leftovers))
    return len(leftovers)


# --- redaction -----------------------------------------------------------------------

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
# `scheme://user:password@`: the user part has no "/", the password may (AWS secrets do).
_USERINFO_WITH_PASSWORD = re.compile(rf"({_SCHEME})[^\s/@:]+:[^\s@]*@")
_USERINFO = re.compile(rf"({_SCHEME})[^\s/@:]+@")
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential"
    r"|signature|sig|awsaccesskeyid|access_token|token|key)=)[^&\s#'\"]*"
)
_SECRET_FIELD = re.compile(
    r"(?i)\b(aws_secret_access_key|aws_session_token|aws_security_token|aws_access_key_id|secret_access_key"
    r"|secret|password|passwd|session_token|token|sas_token|account_key|client_secret|credential|signature)"
    r"""(['"]?\s*[=:]\s*)(['"]?)[^\s'",&;}]+"""
)
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")


def redact(text: str) -> str:
    """`text` with credentials replaced by `***`.

    Covers `scheme://KEY:SECRET@host`, signed-URL query parameters (`X-Amz-Signature`,
    `X-Amz-Credential`, `X-Amz-Security-Token`, GCS and SAS equivalents),
    `name=value` / `'name': 'value'` pairs for secret-like names (aws_secret_access_key,
    secret, token, password, ...), and AWS access key ids. Object keys with an `@` in them
    (`img@2x.png`) are left alone: the user part before `@` must not contain a `/`.
    """
    text = str(text)
    text = _USERINFO_WITH_PASSWORD.sub(r"\1***@", text)
    text = _USERINFO.sub(r"\1***@", text)
    text = _SECRET_QUERY.sub(r"\1***", text)
    text = _SECRET_FIELD.sub(r"\1\2\3***", text)
    return _ACCESS_KEY_ID.sub("***", text)


# --- what counts as transient ---------------------------------------------------------

# OSErrors whose errno says the request itself is wrong: retrying cannot help. s3fs maps
# S3 codes onto these (InvalidBucketName -> EINVAL, PermanentRedirect -> EREMCHG, ...).
_PERMANENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ENOENT", "ENOTDIR", "EISDIR", "EACCES", "EPERM", "EEXIST", "ENOTEMPTY", "EINVAL", "ENAMETOOLONG",
        "ENOSYS", "EMSGSIZE", "EROFS", "ENOSPC", "EDQUOT", "EREMCHG", "EXDEV", "ELOOP", "EBADF",
    ) if hasattr(errno, name)
)
_THROTTLING_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable", "BandwidthLimitExceeded",
})


def _network_error_types() -> tuple[type, ...]:
    """botocore's and aiohttp's connection errors, from the modules already imported.

    An exception of theirs can only exist once its module is loaded, so looking in
    sys.modules is exact, and nobody pays their ~0.2 s import (every model actor and CRF
    worker imports this module) unless S3 is in use.
    """
    import sys

    types: list[type] = []
    exceptions = sys.modules.get("botocore.exceptions")
    if exceptions is not None:
        types += [exceptions.ConnectionError, exceptions.HTTPClientError, exceptions.IncompleteReadError]
    parsers = sys.modules.get("botocore.parsers")
    if parsers is not None:  # throttling responses sometimes carry invalid XML (s3fs#484)
        types.append(parsers.ResponseParserError)
    client_errors = sys.modules.get("aiohttp.client_exceptions")
    if client_errors is not None:
        types += [client_errors.ClientConnectionError, client_errors.ClientPayloadError]
    return tuple(types)


def is_transient(e: BaseException) -> bool:
    """True when retrying the same call later may succeed."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    if isinstance(e, (TimeoutError, ConnectionError) + _network_error_types()):
        return True
    response = getattr(e, "response", None)  # botocore ClientError, not translated by s3fs
    if isinstance(response, dict) and "Error" in response:
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or response["Error"].get("Code") in _THROTTLING_CODES
    if isinstance(e, OSError):
        return e.errno not in _PERMANENT_ERRNOS
    return False


# --- helpers ----------------------------------------------------------------------------


def _resolve(target: Target, storage_options: dict | None) -> tuple[fsspec.AbstractFileSystem, str]:
    if isinstance(target, tuple):
        return target
    return filesystem_for(target, storage_options)


def _replace_local(path: str, data: bytes) -> None:
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    staging = os.path.join(directory, f".{name[:_STAGING_NAME_MAX]}.{uuid.uuid4().hex}.tmp")
    try:
        with open(staging, "xb") as f:  # not NamedTemporaryFile: it would create the file 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise
    # Make the rename itself durable; some filesystems cannot fsync a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _is_botocore_param_error(e: BaseException) -> bool:
    return type(e).__name__ == "ParamValidationError" and type(e).__module__.startswith("botocore")


def _is_missing_credentials(e: BaseException) -> bool:
    return type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError") and type(e).__module__.startswith("botocore")
