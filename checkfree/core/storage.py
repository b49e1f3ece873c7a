"""
Storage
=======

Where files live that must outlive a machine: a local path or an fsspec URL (``s3://bucket/prefix``,
``gs://...``, ``memory://...``), for checkpoints, logs that outlive a spot VM, and data read from a bucket.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.registry import known_implementations


def is_url(path: str | Path) -> bool:
    """Whether ``path`` names a remote filesystem (``s3://...``), not a local path."""
    protocol = split_protocol(str(path))[0]
    return protocol not in (None, "file", "local")


def open_storage(
    root: str | Path, storage_options: Mapping[str, Any] | None = None, what: str = "checkpoint storage"
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of ``root``, a local path or a URL such as ``s3://bucket/prefix``.

    Raises:
        ValueError: no fsspec implementation of the URL's protocol is known or installed, or the filesystem
            refused ``storage_options`` (named by key only: values may be credentials).
    """
    url = str(root)
    try:
        fs, path = url_to_fs(url, **dict(storage_options or {}))
    except ImportError as e:
        protocol = (split_protocol(url)[0] or "file").split("::")[-1]
        known = known_implementations.get(protocol, {}).get("class", "")
        missing = e if isinstance(e, ModuleNotFoundError) else e.__cause__
        package = known.split(".")[0] or getattr(missing, "name", None) or "?"
        raise ValueError(
            f"{what} {url!r}: the {protocol!r} filesystem needs the package {package!r}, "
            f"which is not installed (pip install {package})"
        ) from e
    except ValueError as e:  # fsspec: "Protocol not known: ..."
        raise ValueError(f"{what} {url!r}: {e}; is it a path or a URL fsspec knows?") from e
    except TypeError as e:
        keys = sorted(storage_options or {})
        raise ValueError(f"{what} {url!r} refused storage_options with keys {keys}: {e}") from e
    return fs, path.rstrip("/") or path


CACHE_ENV = "CHECKFREE_DATA_CACHE"  # where data read from a URL is kept (default ~/.cache/checkfree/data)
_GLOB = set("*?[")


def local_copy(url: str, what: str = "data.path") -> str:
    """A local copy of what ``url`` names (a folder's files, one file, or a glob's matches), fetched into the
    cache when missing or changed (another size), and the local path to read in its place (for a glob, the
    same glob in the cache). Each file is written to a temporary name first, then renamed: a peer killed
    mid-download leaves no torn file.

    Raises:
        FileNotFoundError: nothing is there (the message names ``what`` and the URL). ValueError: no
            filesystem can open the URL (``open_storage``).
    """
    import hashlib
    import os

    fs, path = open_storage(url, None, what=what)
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "checkfree" / "data")
    cache = base / hashlib.sha1(url.encode()).hexdigest()[:16]
    if _GLOB & set(path):
        prefix = path[: min(path.index(c) for c in _GLOB if c in path)].rpartition("/")[0]
        remote = sorted(fs.glob(path))
        target = str(cache / path[len(prefix) :].lstrip("/"))
    elif fs.isdir(path):
        prefix, remote, target = path, sorted(f for f in fs.ls(path, detail=False) if fs.isfile(f)), str(cache)
    elif fs.isfile(path):
        prefix = path.rpartition("/")[0]
        remote, target = [path], str(cache / path.rpartition("/")[2])
    else:
        raise FileNotFoundError(f"{what}={url!r}: nothing there")
    for f in remote:
        local = cache / f[len(prefix) :].lstrip("/")
        size = fs.info(f).get("size")
        if local.is_file() and local.stat().st_size == size:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
        fs.get_file(f, str(tmp))
        os.replace(tmp, local)
    return target
