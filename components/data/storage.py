"""Local disk or object storage behind one fsspec interface.

A ``storage`` mapping (from :class:`StorageConfig`) carries what a non-default S3
endpoint needs; without it, s3fs falls back to the usual AWS environment and
credential chain, which is what a cluster in the cloud uses.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec


@dataclass
class StorageConfig:
    """Object-storage connection settings; every field is optional."""

    endpoint_url: str | None = None
    """S3-compatible endpoint, e.g. ``http://127.0.0.1:9000``; None = AWS."""
    key: str | None = None
    """Access key id; None = the environment's credential chain."""
    secret: str | None = None
    """Secret access key."""
    region: str | None = None
    """Region, exported as AWS_DEFAULT_REGION (passing it to s3fs breaks bucket creation on some servers)."""


def storage_options(storage: dict | StorageConfig | None) -> dict:
    if storage is None:
        return {}
    if isinstance(storage, StorageConfig):
        storage = storage.__dict__
    opts = {}
    if storage.get("endpoint_url"):
        opts["endpoint_url"] = storage["endpoint_url"]
    if storage.get("key"):
        opts["key"] = storage["key"]
        opts["secret"] = storage.get("secret")
    if storage.get("region"):
        os.environ.setdefault("AWS_DEFAULT_REGION", storage["region"])
    return opts


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def open_fs(uri: str, storage: dict | StorageConfig | None = None):
    """``(filesystem, path)`` for a local path or URL."""
    if not is_remote(uri):
        return fsspec.filesystem("file"), os.path.abspath(uri.removeprefix("file://"))
    # fsspec hands every caller in a process the same filesystem object; with its listings cache, a
    # folder listed before Ray workers wrote into it (a resumed job's shards, a resumed sweep's trials)
    # would stay stale, and reading a rewritten object would fail its cached ETag
    return fsspec.core.url_to_fs(uri, use_listings_cache=False, **storage_options(storage))


def is_local_fs(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def pyarrow_fs(uri: str, storage: dict | StorageConfig | None = None):
    """``(pyarrow filesystem, path)`` for Ray Data's ``filesystem=`` argument."""
    import pyarrow.fs as pafs

    fs, path = open_fs(uri, storage)
    if is_local_fs(fs):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    base = base.rstrip("/")
    return "/".join([base, *[p.strip("/") for p in parts]])


def write_bytes(uri: str, data: bytes, storage=None) -> None:
    fs, path = open_fs(uri, storage)
    parent = path.rsplit("/", 1)[0]
    if is_local_fs(fs):
        os.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def upload_tree(local_dir: str, uri: str, storage=None) -> list[str]:
    """Copy every file under ``local_dir`` to the same relative path under ``uri``, overwriting what is
    there (files that only grow, like TensorBoard event files, are sent whole again); returns the URIs."""
    fs, root = open_fs(uri, storage)
    out = []
    for folder, _, files in os.walk(local_dir):
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(folder, name), local_dir).replace(os.sep, "/")
            target = join(root, rel)
            if is_local_fs(fs):
                os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.put_file(os.path.join(folder, name), target)
            out.append(join(uri, rel))
    return out


def read_bytes(uri: str, storage=None) -> bytes:
    fs, path = open_fs(uri, storage)
    with fs.open(path, "rb") as f:
        return f.read()


def exists(uri: str, storage=None) -> bool:
    fs, path = open_fs(uri, storage)
    return fs.exists(path)
