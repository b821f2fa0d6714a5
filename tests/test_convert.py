"""ddpm.convert against diffusers itself: the paper's CIFAR-10 layout (google/ddpm-cifar10-32),
a small layout with attention and learned variances, the scheduler, and the files both ways.

Nothing is downloaded: diffusers' networks are built from their configs with seeded random
weights (PyTorch's default init, so no output layer is zero and every path carries signal)."""

from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pytest
import torch

from ddpm import convert
from ddpm.diffusion import DiffusionConfig
from ddpm.nn import ModelConfig, UNet
from ddpm.schedules import make_betas
from ddpm.training import export_ema, load_ema_model

diffusers = pytest.importorskip("diffusers")

# config.json of google/ddpm-cifar10-32 as published (diffusers' port of the paper's CIFAR-10
# model), plus attention_head_dim null, which today's diffusers needs for its one-head attention.
GOOGLE_CIFAR10 = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
CIFAR10_PARAMETERS = 35_746_307


def diffusers_unet(config: dict, seed: int):
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return diffusers.UNet2DModel(**kwargs).eval()


def inputs(shape, num_timesteps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randint(
        0, num_timesteps, (shape[0],), generator=gen
    )


def perturbed(model: UNet, seed: int) -> UNet:
    """Our network with every tensor moved off its init (zero output layers carry nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def test_cifar10_layout_is_googles_model_exactly():
    theirs = diffusers_unet(GOOGLE_CIFAR10, seed=0)
    config = convert.unet_config_from_diffusers(GOOGLE_CIFAR10)
    # google's file leaves dropout at diffusers' 0.0; the rest is our "cifar10" config.
    assert convert.model_config_for(config) == ModelConfig("cifar10", 32, 3, {"dropout": 0.0})
    ours = UNet(config).eval()
    assert ours.num_parameters() == CIFAR10_PARAMETERS
    assert sum(p.numel() for p in theirs.parameters()) == CIFAR10_PARAMETERS

    ours.load_state_dict(convert.from_diffusers_state_dict(theirs.state_dict(), config))
    x, t = inputs((2, 3, 32, 32), 1000, seed=1)
    with torch.no_grad():
        expected = theirs(x, t).sample
        got = ours(x, t)
    assert expected.abs().mean() > 0.1  # the random weights reach the output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # Back to diffusers' names: the same tensors, bit for bit, and no tensor missing or extra.
    back = convert.to_diffusers_state_dict(ours.state_dict(), config)
    reference = theirs.state_dict()
    assert set(back) == set(reference)
    assert all(torch.equal(back[k], reference[k]) for k in reference)
    # Our config for it is google's (with the keys diffusers has added since spelled out).
    exported = convert.diffusers_unet_config(config)
    assert {k: exported[k] for k in GOOGLE_CIFAR10} == GOOGLE_CIFAR10


def test_cifar10_checkpoint_round_trip_through_diffusers_files(tmp_path):
    """ours -> diffusers folder (from_pretrained reads it, same outputs) -> ours, bit for bit."""
    model_config = ModelConfig("cifar10", 32, 3)
    diffusion_config = DiffusionConfig()  # the paper's: linear 1e-4 .. 0.02, T = 1000
    ours = perturbed(model_config.build(seed=0), seed=1)
    config = {
        "model": dataclasses.asdict(model_config),
        "diffusion": dataclasses.asdict(diffusion_config),
        "train": {"steps": 800_000, "batch_size": 128},
        "seed": 3,
    }
    ema = export_ema(
        tmp_path / "ema.pt", {"step": 1234, "ema": ours.state_dict(), "config": config}
    )

    folder = convert.export_diffusers(ema, tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "scheduler_config.json",
    ]
    theirs = diffusers.UNet2DModel.from_pretrained(folder).eval()
    x, t = inputs((2, 3, 32, 32), 1000, seed=2)
    with torch.no_grad():
        expected = ours(x, t)
        got = theirs(x, t).sample
    # 1e-5 of the output's scale: float32 rounding through 35M perturbed weights (outputs up to
    # about 4 here) differs with the order of operations, not with the weights loaded.
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-5)
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder)
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "linear"
    assert scheduler.config.variance_type == "fixed_large"  # σ² = β, our default
    torch.testing.assert_close(
        scheduler.betas, torch.from_numpy(make_betas("linear", 1000)).float(), rtol=1e-6, atol=0
    )

    back = convert.import_diffusers(folder, tmp_path / "back.pt")
    model, diffusion, meta = load_ema_model(back)
    original = ours.state_dict()
    restored = model.state_dict()
    assert set(restored) == set(original)
    assert all(torch.equal(restored[k], original[k]) for k in original)
    # What diffusers cannot hold came back through the "_ddpm" entry.
    assert meta["config"]["model"] == config["model"]
    assert meta["config"]["seed"] == 3 and meta["step"] == 1234
    assert diffusion.num_timesteps == 1000


# A small layout with attention at 8x8 and learned variances (out_channels = 2 x in_channels).
SMALL = {
    **GOOGLE_CIFAR10,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "in_channels": 1,
    "out_channels": 2,
    "sample_size": 16,
}


def test_small_layout_from_a_diffusers_pipeline_folder(tmp_path):
    """Files written by diffusers itself (a pipeline: unet/ and scheduler/, no "_ddpm" entry)."""
    unet = diffusers_unet(SMALL, seed=4)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", variance_type="learned_range"
    )
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")

    path = convert.import_diffusers(tmp_path / "pipe", tmp_path / "small.pt")
    model, diffusion, meta = load_ema_model(path)
    assert meta["config"]["model"] == dataclasses.asdict(
        ModelConfig("tiny", 16, 1, {"attn_resolutions": [8]})
    )
    assert meta["config"]["diffusion"]["schedule"] == "cosine"
    assert diffusion.num_timesteps == 100 and diffusion.output_channels_multiplier == 2
    x, t = inputs((3, 1, 16, 16), 100, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), unet(x, t).sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "diffusion",
    [
        DiffusionConfig(),
        DiffusionConfig("quadratic", 50, 1e-4, 0.02, mean_type="v", var_type="fixed_small"),
        DiffusionConfig("cosine", 200, mean_type="x0"),
        DiffusionConfig("sigmoid", 100, 1e-4, 0.02),
        DiffusionConfig("constant", 30, 0.01, 0.01),
        DiffusionConfig(var_type="learned_range", loss_type="hybrid"),
    ],
    ids=lambda d: f"{d.schedule}-{d.var_type}-{d.mean_type}",
)
def test_scheduler_config_gives_our_betas_and_reads_back(diffusion):
    config = convert.scheduler_config(diffusion)
    scheduler = diffusers.DDPMScheduler.from_config(config)
    expected = make_betas(
        diffusion.schedule, diffusion.num_timesteps, diffusion.beta_start, diffusion.beta_end
    )
    np.testing.assert_allclose(scheduler.betas.double().numpy(), expected, rtol=2e-6, atol=1e-9)
    assert convert.diffusion_config_from_scheduler(json.loads(json.dumps(config))) == diffusion


def test_defaults_tables_match_the_installed_diffusers():
    """A config.json that leaves a key out means diffusers' default; ours must be the same."""
    for cls, table in (
        (diffusers.UNet2DModel, convert._UNET_DEFAULTS),
        (diffusers.DDPMScheduler, convert._SCHEDULER_DEFAULTS),
    ):
        signature = inspect.signature(cls.__init__).parameters
        for key, value in table.items():
            default = signature[key].default
            assert (tuple(default) if isinstance(default, list) else default) == value, key


def test_configs_it_cannot_run_are_refused_by_name(tmp_path):
    # diffusers' default attention_head_dim (8) splits attention into heads: not our network.
    no_head = {k: v for k, v in GOOGLE_CIFAR10.items() if k != "attention_head_dim"}
    with pytest.raises(ValueError, match="attention_head_dim=8"):
        convert.unet_config_from_diffusers(no_head)
    with pytest.raises(ValueError, match=r"flip_sin_to_cos=True.*downsample_padding=1"):
        convert.unet_config_from_diffusers(
            {**GOOGLE_CIFAR10, "flip_sin_to_cos": True, "downsample_padding": 1}
        )
    with pytest.raises(ValueError, match="ch_mult"):
        convert.diffusers_unet_config(ModelConfig("tiny", 16, 1, {"ch_mult": [2, 2]}).unet_config())
    with pytest.raises(ValueError, match="prediction_type='bogus'"):
        convert.diffusion_config_from_scheduler({"prediction_type": "bogus"})

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        convert.import_diffusers(tmp_path / "nothing", tmp_path / "x.pt")
    # Weights that do not fit the config: the folder is named.
    folder = tmp_path / "mismatch"
    diffusers_unet(SMALL, seed=0).save_pretrained(folder)
    (folder / "scheduler_config.json").write_text(
        json.dumps(
            convert.scheduler_config(DiffusionConfig(var_type="learned_range", loss_type="hybrid"))
        )
    )
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layers_per_block": 2}))
    with pytest.raises(ValueError, match="do not fit") as err:
        convert.import_diffusers(folder, tmp_path / "x.pt")
    assert str(folder) in str(err.value)
