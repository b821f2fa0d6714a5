"""sample stage: N images from the EMA model, as Parquet shards spread over Ray workers, + grid.png.

The model is the file `sample.checkpoint` names: the train stage's `${train.out_dir}/ema.pt` by
default, or any EMA export or checkpoint (the paper's weights after `ddpm convert
--from-diffusers`, a `ddpm train` run). `preflight` loads it before Ray starts and checks it
against the prepared data (pipelines.params.check_checkpoint).

Shard i holds images [i*shard_size, (i+1)*shard_size) drawn with its own generator seeded from
(seed, i), ddpm.seeding's "sample.shard" stream. Each shard file records a fingerprint of
everything its pixels depend on (the EMA weights' sha256, the sampler params, the batch size, the
seed); a rerun keeps shards whose fingerprint matches and regenerates the rest. So an interrupted
run resumes where it stopped (dvc.yaml declares the folder `persist: true`), a deleted shard comes
back bit-identical (on the same hardware and library versions), and a new model or sampler never
mixes with old shards.

Sampling tasks run anywhere in the cluster: they load the EMA weights from the shared store
(storage.root, pipelines/store.py; the driver publishes them under their sha256) and write each
shard to `<storage.root>/samples/<fingerprint>/`; the driver copies the shards into the DVC output
folder. Shards already in the store count as done, so a stage interrupted after some tasks
finished does not draw them again.

The folder is a ddpm.data split (shard-*.parquet + manifest.json, unlabelled) written with
ddpm.data's shard writer, the fingerprint stored in each shard's Parquet schema metadata, so
`ddpm.data.load_split(samples_dir)` reads it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from ddpm.data import (
    SHARD_NAME,
    encode_image,
    load_split,
    shard_bytes,
    shard_entry,
    shard_metadata,
    write_manifest,
)
from ddpm.images import image_grid, png_bytes, to_nhwc
from ddpm.io_utils import atomic_write, file_digest
from ddpm.sampling import SamplerConfig, draw_images, fast_network
from ddpm.sampling import network_switches as resolve_switches
from ddpm.seeding import derive_seed
from pipelines.cluster import gpu_available
from pipelines.params import (
    Params,
    SampleParams,
    check_checkpoint,
    samples_train_output,
    train_output,
)
from pipelines.plots import image_grid_png, timestep_strip
from pipelines.project import absolute, shared_store, trained_model_params
from pipelines.run_info import phase
from pipelines.stage_cli import stage_main
from pipelines.store import Store

FINGERPRINT_KEY = "ddpm.sample.fingerprint"
# The store folder of sample shards, one subfolder per fingerprint.
SAMPLES_DIR = "samples"
# A planned shard: (index, rows, generator seed).
Shard = tuple[int, int, int]


def network_switches(s: SampleParams, device: str) -> dict[str, bool]:
    """sample.precision / channels_last / compile resolved for the sampling device by the
    library's rule (ddpm.precision). The driver may not see the GPU it plans for, so it assumes
    bf16 there; generate_shards checks the GPU of the node it runs on."""
    return resolve_switches(
        s.precision,
        device,
        channels_last=s.channels_last,
        compile=s.compile,
        key="sample.precision",
        bf16_supported=True,
    )


def fingerprint(model_sha256: str, s: SampleParams, seed: int, device: str = "cpu") -> str:
    """Everything the pixels of a shard depend on (not the number of workers; the device only
    through the network's speed switches, recorded when any is on)."""
    keys = {
        "model_sha256": model_sha256,
        "seed": seed,
        **s.kwargs(),
        "batch_size": s.batch_size,
        "shard_size": s.shard_size,
    }
    switches = network_switches(s, device)
    if any(switches.values()):
        keys["network"] = switches
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()


def shard_plan(s: SampleParams, seed: int) -> list[Shard]:
    """(index, rows, seed) of every shard."""
    count = math.ceil(s.num_images / s.shard_size)
    return [
        (
            i,
            min(s.shard_size, s.num_images - i * s.shard_size),
            derive_seed(seed, "sample.shard", i),
        )
        for i in range(count)
    ]


def shard_is_current(path: Path, fp: str, rows: int) -> bool:
    """Whether `path` is a finished shard of this fingerprint with the planned number of rows."""
    found = shard_metadata(path)
    return found is not None and found == ({FINGERPRINT_KEY: fp}, rows)


def generate_shards(
    shared: Store,
    ema_key: str,
    plan: list[Shard],
    fp: str,
    sampler: SamplerConfig,
    batch_size: int,
    device: str,
    switches: dict[str, bool],
) -> list[dict[str, Any]]:
    """Worker body: load the EMA model once, write each planned shard to the store."""
    from ddpm.training import load_ema_model

    model, diffusion, _ = load_ema_model(shared.fetch_file(ema_key), device)
    # The driver resolved auto without seeing the GPU; what it has is known only here.
    if switches["bf16"] and device == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            "sample.precision means bf16 here (bf16, or auto with sample.use_gpu), but this "
            "node's GPU has no bf16 support; set sample.precision: fp32"
        )
    network = fast_network(model, **switches)
    done = []
    for index, rows, seed in plan:
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        images = draw_images(
            diffusion,
            network,
            rows,
            model.config.image_shape,
            sampler,
            batch_size=batch_size,
            generator=generator,
        )
        data = shard_bytes(
            [encode_image(image, "raw") for image in images],
            [-1] * rows,
            [f"sample/{index}/{i}" for i in range(rows)],
            metadata={FINGERPRINT_KEY: fp},
        )
        shared.write_bytes(f"{SAMPLES_DIR}/{fp}/{SHARD_NAME.format(index)}", data)
        seconds = time.perf_counter() - started
        print(f"[sample] shard {index}: {rows} images in {seconds:.1f} s", flush=True)
        done.append({"index": index, "rows": rows, "seconds": seconds})
    return done


def trajectory_frames(
    shared: Store, ema_key: str, s: SampleParams, seed: int, device: str, images: int = 6
) -> tuple[list[int], list[np.ndarray]]:
    """The reverse process x_T -> x_0 of a few images at s.trajectory_frames moments: the
    paper's t of each and the images then (uint8 NHWC, one array per moment)."""
    from ddpm.sampling import sample
    from ddpm.training import load_ema_model

    model, diffusion, _ = load_ema_model(shared.fetch_file(ema_key), device)
    steps = s.num_steps or diffusion.num_timesteps
    stride = max(1, steps // max(1, s.trajectory_frames - 1))
    _, trajectory = sample(
        diffusion,
        model,
        (images, *model.config.image_shape),
        generator=torch.Generator().manual_seed(derive_seed(seed, "sample.trajectory")),
        return_trajectory=True,
        trajectory_stride=stride,
        **s.kwargs(),
    )
    return [t for t, _ in trajectory], [to_nhwc(x) for _, x in trajectory]


def preflight(params: Params, data_required: bool = False) -> None:
    """sample.checkpoint exists, loads and fits the prepared data (evaluate requires the data)."""
    path = absolute(params.sample.checkpoint)
    shape = check_checkpoint(
        params, path, absolute(params.data.out_dir), data_required=data_required
    )
    if not samples_train_output(params):
        print(
            f"[checkpoint] sample.checkpoint {path} (images {list(shape)}, CHW), not the train "
            f"stage's {train_output(params)}",
            flush=True,
        )


def sampling_device(use_gpu: bool) -> str:
    if use_gpu and not gpu_available():
        raise ValueError("sample.use_gpu is true but the Ray cluster has no GPU; set it to false")
    return "cuda" if use_gpu else "cpu"


def stale_shard_names(names: list[str], plan: list[Shard], todo: list[Shard]) -> list[str]:
    """The shard files among `names` that this plan does not keep: those it draws again and
    those beyond its last shard."""
    redo = {index for index, _, _ in todo}
    keep = {SHARD_NAME.format(i) for i, _, _ in plan if i not in redo}
    return [name for name in names if name not in keep]


def worker_groups(todo: list[Shard], num_workers: int) -> list[list[Shard]]:
    """The shards each sampling task draws: round robin, no empty task."""
    return [group for group in (todo[w::num_workers] for w in range(num_workers)) if group]


def sampler_record(s: SampleParams, seed: int, switches: dict[str, bool]) -> dict[str, Any]:
    """The manifest's account of how the images were drawn."""
    return {
        **s.kwargs(),
        "batch_size": s.batch_size,
        "seed": seed,
        **({"network": switches} if any(switches.values()) else {}),
    }


def sampling_metrics(plan: list[Shard], todo: list[Shard], seconds: float) -> dict[str, float]:
    """The MLflow metrics of this run's sampling (`seconds`: its wall time)."""
    generated = sum(rows for _, rows, _ in todo)
    return {
        "shards_total": len(plan),
        "shards_generated": len(todo),
        "images_generated": generated,
        "sampling_seconds": seconds,
        **({"images_per_second": generated / seconds} if generated else {}),
    }


def resume(shared: Store, out_dir: Path, plan: list[Shard], fp: str) -> list[Shard]:
    """Bring this fingerprint's finished shards from the store into `out_dir`, delete what is
    stale in both places, and return the planned shards still to draw."""
    # Shards of other fingerprints in the store are stale; this fingerprint's are done work.
    for name in shared.list_dirs(SAMPLES_DIR):
        if name != fp:
            shared.delete(f"{SAMPLES_DIR}/{name}")
    for name in shared.list_files(f"{SAMPLES_DIR}/{fp}"):
        local = out_dir / name
        found = shard_metadata(local)
        if name.startswith("shard-") and (found is None or found[0] != {FINGERPRINT_KEY: fp}):
            shared.download(f"{SAMPLES_DIR}/{fp}/{name}", local)
    todo = [
        (index, rows, seed)
        for index, rows, seed in plan
        if not shard_is_current(out_dir / SHARD_NAME.format(index), fp, rows)
    ]
    # Anything else in the folder is stale: other fingerprints, or shards beyond num_images.
    existing = [path.name for path in out_dir.glob("shard-*.parquet")]
    for name in stale_shard_names(existing, plan, todo):
        (out_dir / name).unlink()
    for name in ("manifest.json", "grid.png"):
        (out_dir / name).unlink(missing_ok=True)
    return todo


def draw_shards(
    params: Params,
    shared: Store,
    ema_key: str,
    todo: list[Shard],
    fp: str,
    device: str,
    out_dir: Path,
) -> None:
    """Sampling tasks for the shards in `todo`, then their files from the store into
    `out_dir`."""
    s = params.sample
    # A task whose worker or node dies is run again (each shard is written whole, and the same
    # shard comes out of every attempt).
    task = ray.remote(num_cpus=1, num_gpus=1 if s.use_gpu else 0, max_retries=3)(generate_shards)
    switches = network_switches(s, device)
    refs = [
        task.remote(
            shared, ema_key, group, fp, params.sampler_config(), s.batch_size, device, switches
        )
        for group in worker_groups(todo, s.num_workers)
    ]
    ray.get(refs)
    for index, _, _ in todo:
        name = SHARD_NAME.format(index)
        shared.download(f"{SAMPLES_DIR}/{fp}/{name}", out_dir / name)


def write_sample_set(
    params: Params, out_dir: Path, plan: list[Shard], fp: str, device: str
) -> tuple[dict[str, Any], np.ndarray, int]:
    """manifest.json and grid.png of the finished shards; returns the manifest, the grid
    (uint8 HWC) and the model's training step."""
    from ddpm.training import load_ema_model

    s = params.sample
    model, _, meta = load_ema_model(absolute(s.checkpoint), "cpu")
    channels, height, width = model.config.image_shape
    manifest = write_manifest(
        out_dir,
        dataset="samples",
        split="samples",
        shape=[height, width, channels],
        encoding="raw",
        label_names=[],
        label_counts=[],
        shards=[shard_entry(out_dir / SHARD_NAME.format(index)) for index, _, _ in plan],
        extra={
            "fingerprint": fp,
            "sampler": sampler_record(s, params.seed, network_switches(s, device)),
        },
    )
    # The grid: the first grid_size**2 samples, in shard order.
    samples, _ = load_split(out_dir, max_rows=s.grid_size**2)
    grid = image_grid(to_nhwc(samples), ncol=s.grid_size)
    with atomic_write(out_dir / "grid.png", "wb") as handle:
        handle.write(png_bytes(grid))
    print(f"[sample] {manifest['count']} images in {out_dir}; grid {out_dir / 'grid.png'}")
    return manifest, grid, meta["step"]


def draw_pictures(
    params: Params,
    shared: Store,
    ema_key: str,
    grid: np.ndarray,
    count: int,
    step: int,
    device: str,
) -> list[Path]:
    """The pictures for people: the grid enlarged and the reverse process of a few images (a
    Ray task)."""
    s = params.sample
    plots_dir = absolute(params.evaluate.plots_dir)
    grid_png = image_grid_png(
        grid,
        plots_dir / "samples.png",
        title=f"The first {s.grid_size**2} of {count} samples: {s.method}, "
        f"{s.num_steps or 'all'} steps, model step {step}",
    )
    strip_task = ray.remote(num_cpus=1, num_gpus=1 if s.use_gpu else 0)(trajectory_frames)
    timesteps, columns = ray.get(strip_task.remote(shared, ema_key, s, params.seed, device))
    strip_png = timestep_strip(
        timesteps,
        columns,
        plots_dir / "reverse_process.png",
        title=f"Reverse process p(x_{{t-1}} | x_t) from x_T, {s.method} sampling",
    )
    return [grid_png, strip_png]


def log_sampling(
    grid: np.ndarray, pictures: list[Path], metrics: dict[str, float], step: int
) -> None:
    import mlflow

    mlflow.log_image(grid, "samples/grid.png")
    for path in pictures:
        mlflow.log_artifact(str(path), "samples")
    mlflow.log_metrics(metrics)
    mlflow.set_tag("model_step", str(step))


def run(params: Params) -> dict[str, Any]:
    s = params.sample
    ema_path = absolute(s.checkpoint)  # checked by preflight
    out_dir = absolute(s.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = sampling_device(s.use_gpu)
    shared = shared_store(params)
    ema_sha256 = file_digest(ema_path)
    fp = fingerprint(ema_sha256, s, params.seed, device)
    plan = shard_plan(s, params.seed)
    todo = resume(shared, out_dir, plan, fp)
    print(
        f"[sample] {len(plan) - len(todo)} of {len(plan)} shards already done; generating "
        f"{len(todo)} with {s.method} ({s.num_steps or 'all'} steps) on {s.num_workers} workers",
        flush=True,
    )
    started = time.perf_counter()
    with phase("publish"):
        ema_key = shared.publish_file(ema_path, ema_sha256)  # hashed once, above
    if todo:
        with phase("compute"):
            draw_shards(params, shared, ema_key, todo, fp, device, out_dir)
    metrics = sampling_metrics(plan, todo, time.perf_counter() - started)
    with phase("outputs"):
        manifest, grid, step = write_sample_set(params, out_dir, plan, fp, device)
        pictures = draw_pictures(params, shared, ema_key, grid, manifest["count"], step, device)
    with phase("mlflow_log"):
        log_sampling(grid, pictures, metrics, step)
    return manifest


def main(argv: list[str] | None = None) -> None:
    stage_main("sample", run, __doc__, argv, preflight=preflight, overlay=trained_model_params)


if __name__ == "__main__":
    main()
