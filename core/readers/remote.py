"""Objects in stores reached by URL (``s3://``, ``gs://``, ``http(s)://``): the fsspec plumbing, in one place.

A remote input's path is a :class:`RemotePath`, the URL carrying the fsspec
storage options given for it (``--storage-option KEY=VALUE``), so a task
pickled to a ``--jobs`` process or a Dask worker opens its own ranges with
the same options. Credentials and endpoints otherwise come the standard way
(``AWS_*`` variables and config files, ``AWS_ENDPOINT_URL``), through the
packages fsspec uses.

Readers get from a :class:`RemoteObject` either byte ranges
(:meth:`RemoteObject.read_into`: one request per read block, straight into
the block's buffer) or a file object with a read-ahead cache the size of a
read block (:meth:`RemoteObject.open`), so memory stays bounded by the block.
Timeouts are short and retries few, so an unreachable host or a missing
object ends in one line naming the URL, in bounded time.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
from typing import Any, Iterator, Mapping, Optional, Sequence

from ..errors import DataError, NormstatsError, UsageError

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# scheme -> the packages fsspec needs for it (each with the module imported to check)
PACKAGES = {"s3": ("s3fs",), "s3a": ("s3fs",), "gs": ("gcsfs",), "gcs": ("gcsfs",),
            "http": ("aiohttp",), "https": ("aiohttp",)}
CONNECT_SECONDS = 5
READ_SECONDS = 60
RETRIES = 2
# botocore's, by name (botocore is imported only with s3fs)
CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")


def is_url(spec: Any) -> bool:
    """Whether `spec` names an object by URL (``scheme://...``)."""
    return isinstance(spec, str) and URL.match(spec) is not None


class RemotePath(str):
    """A URL that carries the fsspec storage options to open it with.

    It is the string of the URL (messages, metadata and specs show it as
    given); the options travel with it when pickled.

    Examples
    --------
    >>> p = RemotePath("s3://b/x.npy", {"anon": True})
    >>> p, p.options, str(p) is p
    ('s3://b/x.npy', {'anon': True}, True)
    """

    options: dict

    def __new__(cls, url: str, options: Optional[Mapping[str, Any]] = None) -> "RemotePath":
        path = super().__new__(cls, url)
        path.options = dict(options or getattr(url, "options", {}) or {})
        return path

    def __str__(self) -> str:  # str(path) keeps the options (str() of a str subclass would drop them)
        return self

    def __reduce__(self) -> tuple:
        return RemotePath, (str.__str__(self), self.options)

    def with_suffix(self, suffix: str) -> "RemotePath":
        """This URL with `suffix` appended (e.g. a member of a Zarr store), same options."""
        return RemotePath(str.__str__(self).rstrip("/") + suffix, self.options)


def absolute(path: str) -> str:
    """`path` as workers that do not share this process's folder can open it (a URL as it is)."""
    return path if is_url(path) else os.path.abspath(path)


def with_options(specs: Sequence[Optional[str]], options: Mapping[str, Any]) -> tuple:
    """`specs` with each URL made a :class:`RemotePath` carrying `options` (others as given)."""
    return tuple(RemotePath(s, options) if is_url(s) else s for s in specs)


def parse_storage_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (KEY, VALUE), the value parsed as JSON when it parses, else a string.

    Examples
    --------
    >>> parse_storage_option("anon=true"), parse_storage_option("client_kwargs={\\"region_name\\": \\"eu\\"}")
    (('anon', True), ('client_kwargs', {'region_name': 'eu'}))
    >>> parse_storage_option("profile=dev")
    ('profile', 'dev')

    Raises
    ------
    UsageError
        No ``=`` or an empty key.
    """
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise UsageError(f"--storage-option takes KEY=VALUE (e.g. anon=true), got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def _require(url: str) -> Any:
    scheme = URL.match(url).group(1).lower()
    for module in ("fsspec",) + PACKAGES.get(scheme, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            needs = " and ".join(("fsspec",) + PACKAGES.get(scheme, ()))
            more = " gcsfs" if scheme in ("gs", "gcs") else ""
            raise UsageError(f"reading {url} needs {needs}; pip install 'normstats[remote]'{more}") from None
    return importlib.import_module("fsspec")


def _filesystem(url: str, options: Mapping[str, Any]) -> Any:
    """The fsspec file system of `url`, with short timeouts and few retries unless `options` set them."""
    fsspec = _require(url)
    scheme = URL.match(url).group(1).lower()
    kwargs = dict(options)
    if scheme in ("s3", "s3a"):
        config = dict(kwargs.pop("config_kwargs", {}) or {})
        config.setdefault("connect_timeout", CONNECT_SECONDS)
        config.setdefault("read_timeout", READ_SECONDS)
        config.setdefault("retries", {"max_attempts": RETRIES, "mode": "standard"})
        kwargs["config_kwargs"] = config
    elif scheme in ("http", "https") and "client_kwargs" not in kwargs:
        import aiohttp

        kwargs["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(sock_connect=CONNECT_SECONDS,
                                                                    sock_read=READ_SECONDS)}
    try:
        fs = fsspec.filesystem(scheme, **kwargs)
    except (TypeError, ValueError) as error:
        raise UsageError(f"{url}: the storage options {sorted(options)} are not those of {scheme}:// "
                         f"({error})") from None
    if hasattr(fs, "retries") and "retries" not in options:
        fs.retries = RETRIES  # s3fs retries its own way on top of botocore's (5 by default)
    return fs


@contextlib.contextmanager
def failures(url: str, doing: str = "read") -> Iterator[None]:
    """Any failure of the store while `doing` `url` as one line naming the URL."""
    try:
        yield
    except NormstatsError:
        raise
    except FileNotFoundError:
        raise UsageError(f"{url} does not exist (no such object or bucket)") from None
    except PermissionError as error:
        raise UsageError(f"{url} cannot be {doing} (access denied: {_first_line(error)}); check the "
                         "credentials (AWS_* variables, config files or --storage-option)") from None
    except Exception as error:  # the stores' clients raise many kinds (botocore, aiohttp, OSError, ...)
        if type(error).__name__ in CREDENTIAL_ERRORS:
            raise UsageError(f"{url} cannot be {doing}: no credentials found ({_first_line(error)}); set "
                             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile in ~/.aws, or "
                             "--storage-option anon=true for a public bucket") from None
        raise DataError(f"{url} cannot be {doing} ({type(error).__name__}: {_first_line(error)}); check "
                        "the address, the endpoint (AWS_ENDPOINT_URL) and the network") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


class RemoteObject:
    """One object (or a Zarr store's prefix) of a store, by URL.

    Parameters
    ----------
    url : str or RemotePath
        The object's URL; a RemotePath's storage options are used.
    """

    def __init__(self, url: str) -> None:
        self.url = url if isinstance(url, RemotePath) else RemotePath(url)
        self.options = self.url.options
        with failures(self.url, "opened"):
            self.fs = _filesystem(self.url, self.options)

    def info(self, url: Optional[str] = None) -> dict:
        """The store's metadata of `url` (default: this object)."""
        url = url or self.url
        with failures(url):
            self.fs.invalidate_cache(str.__str__(url))  # a listing cached by fsspec would hide a change
            return self.fs.info(str.__str__(url))

    def identity(self, url: Optional[str] = None) -> tuple:
        """What must stay the same while the object is read, laid out like a local file's
        (device, inode, size, mtime): (URL, ETag or checksum, size, last modification)."""
        info = self.info(url)
        if info.get("type") == "directory":
            raise UsageError(f"{url or self.url} is a folder of the store, not an object; name the object")
        tag = next((str(info[key]) for key in ("ETag", "etag", "md5Hash", "crc32c", "VersionId") if info.get(key)),
                   "")
        changed = str(info.get("LastModified") or info.get("mtime") or info.get("updated") or "")
        return str.__str__(url or self.url), tag, int(info.get("size") or 0), changed

    def exists(self, url: str) -> bool:
        with failures(url):
            return bool(self.fs.exists(str.__str__(url)))

    def read(self, start: int, stop: int) -> bytes:
        """Bytes ``start:stop`` of the object (fewer only at its end), in one ranged request."""
        with failures(self.url):
            return self.fs.cat_file(str.__str__(self.url), start=start, end=stop)

    def read_into(self, view: memoryview, offset: int) -> int:
        """Fill `view` with the bytes at `offset`; return how many the object had (fewer only at its end)."""
        data = self.read(offset, offset + len(view))
        view[:len(data)] = data
        return len(data)

    def open(self, block_size: int) -> Any:
        """A binary file object reading ahead `block_size` bytes per request (h5py, pyarrow): a read block."""
        with failures(self.url, "opened"):
            return self.fs.open(str.__str__(self.url), "rb", block_size=block_size, cache_type="readahead")

    def zarr_store(self, zarr: Any) -> Any:
        """A read-only Zarr store of this URL's prefix (zarr 3's FsspecStore, else an fsspec mapper)."""
        with failures(self.url, "opened"):
            fsspec_store = getattr(getattr(zarr, "storage", None), "FsspecStore", None)
            if fsspec_store is not None:
                return fsspec_store.from_url(str.__str__(self.url), storage_options=self._async_options(),
                                             read_only=True)
            return self.fs.get_mapper(str.__str__(self.url))

    def _async_options(self) -> dict:
        """The options `_filesystem` adds (timeouts, retries), for a file system zarr makes itself."""
        options = dict(self.options)
        if hasattr(self.fs, "config_kwargs"):
            options.setdefault("config_kwargs", self.fs.config_kwargs)
        return options
