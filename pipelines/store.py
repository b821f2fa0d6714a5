"""The pipeline's shared store: the one place Ray workers read from and write to.

On a cluster a worker runs on another machine than the stage's driver, so it can never open the
driver's files (the repository, DVC's outputs). Everything a worker needs goes through one root
that every node reaches, named by `storage.root` in params.yaml (else $DDPM_STORAGE, else the
local folder `store/` in the repository, which is enough on one machine):

    s3://bucket/prefix     S3 or any S3-compatible server (MinIO); endpoint, region and
                           credentials come from the usual AWS_* environment variables
    gs://bucket/prefix     Google Cloud Storage
    /mnt/shared/ddpm       a folder every node mounts at the same path (NFS)

Layout under the root (keys are '/'-separated paths relative to it):

    data/<digest>/...              a prepared dataset, published under the digest of its manifests
    blobs/<sha256>/<name>          single files workers load (EMA weights, classifier, Inception)
    ray/                           Ray Train and Tune storage (checkpoints, trial results)
    samples/<fingerprint>/...      sample shards written by the sampling tasks
    cache/...                      feature statistics shared between evaluate runs

The driver moves data between DVC's outputs and the store (`publish_*`, `download_*`); workers
copy what they read into a node-local cache (`fetch_*`). Content-addressed keys (data/, blobs/)
never change once complete, so a node fetches each at most once. A folder is complete when its
marker file exists: uploads write it last, so a reader never sees half a dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from functools import cache
from pathlib import Path

from pyarrow import fs as pafs

from ddpm.io_utils import file_digest

STORAGE_ENV = "DDPM_STORAGE"
# Node-local copies of content-addressed keys; default ~/.cache/ddpm/store.
CACHE_ENV = "DDPM_CACHE"
COMPLETE = "_COMPLETE"
# Environment the S3 client reads that is not a secret, so the driver may hand it to workers.
S3_SETTINGS_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@cache
def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path of the root in it); cached per process (one client per bucket)."""
    if "://" not in root:
        return pafs.LocalFileSystem(), root
    scheme = root.split("://", 1)[0]
    if scheme == "s3":
        bucket_path = root.split("://", 1)[1].rstrip("/")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        options: dict = {}
        if endpoint:
            # S3-compatible servers (MinIO, moto) speak plain http on a private endpoint and
            # need path-style addressing.
            options["endpoint_override"] = endpoint
            options["scheme"] = "https" if endpoint.startswith("https") else "http"
            options["force_virtual_addressing"] = False
        if region:
            options["region"] = region
        return pafs.S3FileSystem(**options), bucket_path
    filesystem, path = pafs.FileSystem.from_uri(root)
    return filesystem, path.rstrip("/")


def node_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ddpm" / "store")


def check_key(key: str, *, root_ok: bool = False) -> str:
    """`key` when it is a key in normal form, else ValueError naming it.

    A key is a relative '/'-separated path: not absolute, no backslash, no empty, '.' or '..'
    segment (so no '//', './' or trailing '/'), and so it cannot leave the store's root or the
    node cache, whatever wrote it (a caller, an object listing). "" is the root itself, allowed
    only with `root_ok` (listings, messages), never where a file is written or deleted.
    """
    if not isinstance(key, str):
        raise ValueError(f"store key {key!r} must be a string")
    if key == "":
        if root_ok:
            return key
        problem = "is empty (the whole store)"
    elif key.startswith("/"):
        problem = "is absolute"
    elif "\\" in key or "\0" in key:
        problem = "contains a backslash or a NUL"
    elif ".." in key.split("/"):
        problem = "has a '..' segment"
    elif any(segment in ("", ".") for segment in key.split("/")):
        problem = "is not in normal form (an empty or '.' segment: '//', './' or a trailing '/')"
    else:
        return key
    raise ValueError(
        f"store key {key!r} {problem}: keys are relative '/'-separated paths inside the store"
    )


def _confine(root: str | os.PathLike, target: str | os.PathLike, key: str, what: str) -> None:
    """ValueError naming `key` unless `target` resolves (symlinks followed) inside `root`."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(target)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise ValueError(f"store key {key!r} resolves to {real}, outside the {what} {real_root}")


@dataclasses.dataclass(frozen=True)
class Store:
    """A root URI or absolute path; cheap to pickle (workers rebuild the client from it)."""

    root: str

    def __post_init__(self) -> None:
        if "://" not in self.root and not os.path.isabs(self.root):
            raise ValueError(f"store root must be an absolute path or a URI, got {self.root!r}")

    @property
    def is_local(self) -> bool:
        return "://" not in self.root

    @property
    def filesystem(self) -> pafs.FileSystem:
        return _filesystem(self.root)[0]

    def path(self, key: str = "") -> str:
        """`key`'s path inside the filesystem (no scheme), as pyarrow and Ray take it. The key
        must be in normal form (`check_key`); on a local store it must also resolve inside the
        root, symlinks followed."""
        base = _filesystem(self.root)[1]
        if not check_key(key, root_ok=True):
            return base
        path = f"{base}/{key}"
        if self.is_local:
            _confine(base, path, key, f"store {self.root}")
        return path

    def uri(self, key: str = "") -> str:
        """`key` as a URI or absolute path, for messages."""
        check_key(key, root_ok=True)
        return f"{self.root.rstrip('/')}/{key}" if key else self.root

    def ray_storage(self, key: str) -> tuple[str, pafs.FileSystem | None]:
        """(storage_path, storage_filesystem) for a Ray Train/Tune RunConfig."""
        if self.is_local:
            return self.path(key), None
        return self.path(key), self.filesystem

    # -- inspection --------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return self.filesystem.get_file_info(self.path(key)).type != pafs.FileType.NotFound

    def is_complete(self, key: str) -> bool:
        return self.exists(f"{check_key(key)}/{COMPLETE}")

    def list_files(self, key: str) -> list[str]:
        """Keys of the files under `key`, relative to it, sorted; [] when there is none."""
        base = self.path(key)
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = self.filesystem.get_file_info(selector)
        names = sorted(
            info.path[len(base) :].lstrip("/") for info in infos if info.type == pafs.FileType.File
        )
        return [self._listed(key, name) for name in names]

    def list_dirs(self, key: str) -> list[str]:
        """Names of the folders directly under `key`."""
        selector = pafs.FileSelector(self.path(key), recursive=False, allow_not_found=True)
        infos = self.filesystem.get_file_info(selector)
        names = sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)
        return [self._listed(key, name, folder=True) for name in names]

    def _listed(self, key: str, name: str, folder: bool = False) -> str:
        """A name an object listing returned, refused unless it is a key in normal form (one
        segment for a folder): an object named '../x' must not send a download elsewhere."""
        try:
            check_key(name)
            if folder and "/" in name:
                raise ValueError(f"store key {name!r} is not one folder name")
        except ValueError as err:
            raise ValueError(f"{self.uri(key)}: its listing holds {err}") from None
        return name

    # -- single files ------------------------------------------------------------------------

    def read_bytes(self, key: str) -> bytes:
        check_key(key)
        try:
            with self.filesystem.open_input_stream(self.path(key)) as stream:
                return stream.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(key)} is not in the store") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write atomically: an object store's put is; a folder gets a temp file + rename."""
        target = self.path(check_key(key))
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            staging = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with open(staging, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, target)
            return
        with self.filesystem.open_output_stream(target) as stream:
            stream.write(data)

    def upload(self, local: str | os.PathLike, key: str) -> None:
        self.path(check_key(key))  # before reading the local file
        self.write_bytes(key, Path(local).read_bytes())

    def download(self, key: str, local: str | os.PathLike) -> Path:
        """Copy `key` to the local file `local` atomically."""
        self.path(check_key(key))
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        staging = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")
        staging.write_bytes(self.read_bytes(key))
        os.replace(staging, local)
        return local

    def move(self, source: str, target: str) -> None:
        self.filesystem.move(self.path(check_key(source)), self.path(check_key(target)))

    def delete(self, key: str) -> None:
        """Remove the folder or file `key` (nothing to do when it is absent)."""
        info = self.filesystem.get_file_info(self.path(check_key(key)))
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.path(key))
        elif info.type == pafs.FileType.File:
            self.filesystem.delete_file(self.path(key))

    # -- folders -----------------------------------------------------------------------------

    def download_dir(self, key: str, local: str | os.PathLike) -> Path:
        """Copy every file under `key` into the local folder `local` (created); every name the
        listing returns must be a key in normal form that stays inside `local`."""
        check_key(key)
        local = Path(local)
        names = self.list_files(key)
        for name in names:
            _confine(local, local / name, f"{key}/{name}", f"folder {local}")
        for name in names:
            self.download(f"{key}/{name}", local / name)
        return local

    def publish_dir(self, local: str | os.PathLike, key: str) -> str:
        """Upload the folder `local` to `key`, its marker last; a complete `key` is kept as it
        is (content-addressed keys never change). Returns `key`."""
        if self.is_complete(check_key(key)):
            return key
        local = Path(local)
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            self.upload(path, f"{key}/{path.relative_to(local).as_posix()}")
        self.write_bytes(f"{key}/{COMPLETE}", b"")
        return key

    def publish_file(self, local: str | os.PathLike, sha256: str) -> str:
        """Upload one file under its content hash; returns its key."""
        key = f"blobs/{sha256}/{Path(local).name}"
        if not self.exists(key):
            self.upload(local, key)
        return key

    def fetch_dir(self, key: str, check: Callable[[Path, str], None]) -> Path:
        """The node-local copy of the complete folder `key`, downloaded on first use.

        `check(folder, uri)` vets a copy against what its key promises (for a dataset: its digest
        and every shard's sha256) and raises ValueError or OSError when it does not hold: a
        fresh download is checked before it becomes the node's copy, so damaged bytes in the
        store fail naming the object instead of being cached; the node's copy is checked again
        on every use, and a damaged one is dropped and fetched again. Several workers on one
        node may fetch at once: each downloads to its own staging folder and the first rename
        wins.
        """
        target = self._cache_path(key)
        if (target / COMPLETE).is_file():
            try:
                check(target, self.uri(key))
                return target
            except (ValueError, OSError) as err:
                print(
                    f"[store] the node copy {target} of {self.uri(key)} is damaged ({err}); "
                    "fetching it again",
                    flush=True,
                )
                aside = target.with_name(f".{target.name}.damaged-{uuid.uuid4().hex[:8]}")
                with contextlib.suppress(OSError):
                    os.replace(target, aside)
                shutil.rmtree(aside, ignore_errors=True)
        if not self.is_complete(key):
            raise FileNotFoundError(
                f"{self.uri(key)} is missing or incomplete (no {COMPLETE} marker): the stage's "
                "driver publishes it before starting workers; is every node using the same "
                "storage root?"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            self.download_dir(key, staging)
            check(staging, self.uri(key))
            try:
                os.replace(staging, target)
            except OSError:
                if not (target / COMPLETE).is_file():  # not a concurrent winner: a real error
                    shutil.rmtree(target, ignore_errors=True)
                    os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def fetch_file(self, key: str) -> Path:
        """The node-local copy of the immutable file `key` (blobs/<sha256>/<name>).

        The bytes are compared with the sha256 in the key before they are cached, and the node's
        copy again on every use (a damaged one is fetched again): a mismatch in the store is a
        ValueError naming the object.
        """
        expected = self._blob_digest(key)
        target = self._cache_path(key)
        if target.is_file():
            if file_digest(target) == expected:
                return target
            print(
                f"[store] the node copy {target} of {self.uri(key)} is damaged; fetching it again",
                flush=True,
            )
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
        data = self.read_bytes(key)
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise ValueError(
                f"{self.uri(key)} is damaged: sha256 {digest} does not match the digest in its "
                "key; delete it from the store and publish the file again"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            staging.write_bytes(data)
            os.replace(staging, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
        return target

    def _blob_digest(self, key: str) -> str:
        parts = check_key(key).split("/")
        if len(parts) != 3 or parts[0] != "blobs" or not _SHA256.match(parts[1]) or not parts[2]:
            raise ValueError(
                f"{self.uri(key)}: not a content-addressed file key (blobs/<sha256>/<name>), so "
                "its bytes cannot be checked"
            )
        return parts[1]

    def _cache_name(self, key: str) -> str:
        # One cache folder per root, so that clearing a store can be mirrored on the nodes.
        return f"{hashlib.sha256(self.root.encode()).hexdigest()[:8]}/{check_key(key)}"

    def _cache_path(self, key: str) -> Path:
        """`key`'s node-cache path, refused unless it resolves inside the node cache."""
        self.path(check_key(key))
        root = node_cache()
        target = root / self._cache_name(key)
        _confine(root, target, key, "node cache")
        return target


def _manifests_digest(data_dir: Path) -> tuple[str, list[Path], list[dict]]:
    """(digest, split folders, their manifests) of a prepared dataset folder, without hashing
    the shards."""
    from ddpm.data import load_manifest
    from ddpm.data.shards import MANIFEST

    splits = sorted(p.parent for p in data_dir.glob(f"*/{MANIFEST}"))
    manifests = [load_manifest(split_dir) for split_dir in splits]
    identity = {split_dir.name: m for split_dir, m in zip(splits, manifests, strict=True)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return digest, splits, manifests


def prepared_digest(data_dir: str | os.PathLike) -> str:
    """The identity of a prepared dataset folder: the sha256 of its splits' manifests.

    Every shard is hashed against its manifest first, so a missing, corrupt or truncated file
    fails here, naming it, before any worker starts or any output is touched.
    """
    from ddpm.data.shards import verify_checksums

    data_dir = Path(data_dir)
    digest, splits, manifests = _manifests_digest(data_dir)
    if not splits:
        raise FileNotFoundError(f"no prepared split in {data_dir}: run prepare first")
    for split_dir, manifest in zip(splits, manifests, strict=True):
        verify_checksums(split_dir, manifest)
    return digest


def _check_prepared(folder: Path, uri: str, expected: str) -> None:
    """Raise ValueError naming `uri` unless `folder` is the dataset whose digest is `expected`:
    its manifests hash to it (so every split it was published with is there, unedited) and
    every shard matches its manifest's sha256."""
    from ddpm.data.shards import verify_checksums

    try:
        digest, splits, manifests = _manifests_digest(folder)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"{uri} is damaged: {err}") from None
    if digest != expected:
        raise ValueError(
            f"{uri} is damaged: the manifests of its splits {[p.name for p in splits]} have "
            f"digest {digest}, not the {expected} in its key (a split missing or a manifest "
            "edited); delete it from the store and publish the dataset again"
        )
    for split_dir, manifest in zip(splits, manifests, strict=True):
        try:
            verify_checksums(split_dir, manifest)
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{uri}/{split_dir.name} in the store is damaged: {err}") from None


def fetch_prepared(store: Store, key: str) -> Path:
    """The node-local copy of a published dataset (data/<digest>), checked against its key: the
    manifests' digest and every shard's sha256."""
    parts = key.split("/")
    if len(parts) != 2 or parts[0] != "data" or not _SHA256.match(parts[1]):
        raise ValueError(f"{store.uri(key)}: not a prepared dataset key (data/<digest>)")
    return store.fetch_dir(key, check=functools.partial(_check_prepared, expected=parts[1]))


def publish_prepared(store: Store, data_dir: str | os.PathLike) -> str:
    """Upload the prepared dataset (once per content) and return its store key."""
    key = f"data/{prepared_digest(data_dir)}"
    if not store.is_complete(key):
        print(f"[store] publishing {data_dir} to {store.uri(key)}", flush=True)
    return store.publish_dir(data_dir, key)


def publish_blob(store: Store, path: str | os.PathLike) -> str:
    """Upload one file (weights) under its sha256; returns the key workers fetch."""
    return store.publish_file(path, file_digest(path, "sha256"))
