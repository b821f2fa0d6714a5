"""Converters between our U-Net checkpoints and diffusers' `UNet2DModel` + `DDPMScheduler`.

The paper's CIFAR-10 network as diffusers ported it (`google/ddpm-cifar10-32`) is a `UNet2DModel`
with block_out_channels (128, 256, 256, 256), two ResNet blocks a level, one-head attention at
16x16 and in the middle, GroupNorm(32, eps 1e-6), sines-first timestep embedding with spacing
log(10000)/(half - 1) (flip_sin_to_cos False, freq_shift 1) and the TensorFlow stride-2 padding
(downsample_padding 0). That is exactly `ddpm.nn.UNet` with the "cifar10" config (35,746,307
parameters in both), and the same holds for any of our configs whose first level keeps the base
width (ch_mult[0] == 1: diffusers' first block always has block_out_channels[0] channels, the
width of conv_in). So the conversion is a renaming of tensors plus one reshape: our attention
projections are 1x1 convolutions ([C, C, 1, 1]), diffusers' are linear layers ([C, C]).

A diffusers folder, as `export_diffusers` writes it (the layout of the google/ddpm-cifar10-32
repository, so `UNet2DModel.from_pretrained(dir)` and `DDPMScheduler.from_pretrained(dir)` both
read it):

    config.json                           UNet2DModel config (+ "_ddpm": our own configs, see below)
    diffusion_pytorch_model.safetensors   the EMA weights under diffusers' names
    scheduler_config.json                 DDPMScheduler config: the β schedule and parameterisation

`import_diffusers` reads that layout, or a pipeline folder (`unet/` and `scheduler/` sub-folders,
as `DDPMPipeline.save_pretrained` writes), with safetensors or `.bin` weights, and writes an EMA
export (`ddpm.training.export_ema`) that `load_ema_model` and the `ddpm` command read.

What diffusers cannot hold (the training loss, the TrainConfig, the seed, the step) travels in the
private "_ddpm" entry of config.json; diffusers drops keys that start with "_" when it builds the
model. On import it is used only when it describes the same network and chain as the diffusers
configs, so a folder edited or re-saved by diffusers is read from diffusers' own fields.

Importing needs neither diffusers nor a network connection: only `safetensors` (a dependency of
diffusers) for .safetensors files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.diffusion import DiffusionConfig
from ddpm.errors import InputError, check_tree, reading, reading_checkpoint, short_repr
from ddpm.io_utils import atomic_write, write_json
from ddpm.nn import UNET_CONFIGS, ModelConfig, UNetConfig
from ddpm.nn.layers import GROUPNORM_EPS
from ddpm.nn.unet import (
    MAX_CH,
    MAX_CH_MULT,
    MAX_IMAGE_CHANNELS,
    MAX_IMAGE_SIZE,
    MAX_LEVELS,
    MAX_RES_BLOCKS,
)
from ddpm.schedules import MAX_TIMESTEPS, SCHEDULES, make_betas
from ddpm.training import configs_of, export_ema, load_ema_model

UNET_CONFIG = "config.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_WEIGHTS_BIN = "diffusion_pytorch_model.bin"
SCHEDULER_CONFIG = "scheduler_config.json"
PROVENANCE_KEY = "_ddpm"

# UNet2DModel settings that make its network ours; anything else is refused on import. The
# second value is why it matters, for the error message.
_FIXED_LAYOUT: dict[str, tuple[Any, str]] = {
    "center_input_sample": (False, "inputs are used as given"),
    "time_embedding_type": ("positional", "sinusoidal timestep embedding"),
    "flip_sin_to_cos": (False, "sines come first in the timestep embedding"),
    "freq_shift": (1, "frequency spacing log(10000)/(half - 1)"),
    "mid_block_type": ("UNetMidBlock2D", "ResBlock, attention, ResBlock in the middle"),
    "mid_block_scale_factor": (1, "unscaled residuals"),
    "downsample_padding": (0, "TensorFlow's SAME padding at stride 2 (bottom/right only)"),
    "downsample_type": ("conv", "stride-2 convolution"),
    "upsample_type": ("conv", "nearest x2 then a convolution"),
    "act_fn": ("silu", "swish activations"),
    "norm_eps": (GROUPNORM_EPS, "GroupNorm epsilon of the official code"),
    "resnet_time_scale_shift": ("default", "the timestep embedding is added, not scale-shift"),
    "add_attention": (True, "attention in the middle block"),
    "class_embed_type": (None, "unconditional"),
    "num_class_embeds": (None, "unconditional"),
}

# diffusers' defaults (UNet2DModel.__init__, diffusers 0.42) for every key read here: a config.json
# that leaves a key out means diffusers' default, which is not always the paper's value.
_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}

# DDPMScheduler.__init__ defaults (diffusers 0.42) for the keys read here.
_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}

# Our schedule names -> diffusers' names for the same β (diffusers' "scaled_linear" is linear in
# √β, our "quadratic"; "squaredcos_cap_v2" is the cosine schedule with β capped at 0.999). The
# constant schedule has no diffusers name and travels as trained_betas.
_SCHEDULE_TO_DIFFUSERS = {
    "linear": "linear",
    "quadratic": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
    "sigmoid": "sigmoid",
}
_VARIANCE_TO_DIFFUSERS = {
    "fixed_large": "fixed_large",
    "fixed_small": "fixed_small",
    "learned_range": "learned_range",
}
_VARIANCE_FROM_DIFFUSERS = {
    **{v: k for k, v in _VARIANCE_TO_DIFFUSERS.items()},
    # The *_log variants compute the same variance in log space.
    "fixed_small_log": "fixed_small",
    "fixed_large_log": "fixed_large",
}
_PREDICTION_TO_DIFFUSERS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}

# Module kinds and their parameter names (ours -> diffusers'). Plain modules keep their names.
_PLAIN, _RES, _ATTN = "plain", "res", "attn"
_LEAVES = {
    _RES: {
        "norm1": "norm1",
        "conv1": "conv1",
        "temb_proj": "time_emb_proj",
        "norm2": "norm2",
        "conv2": "conv2",
        "skip": "conv_shortcut",
    },
    _ATTN: {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
}
_ATTN_PROJECTIONS = ("q", "k", "v", "proj_out")
# Names of diffusers' attention layers before diffusers 0.14 (AttentionBlock); files of that age,
# such as the first upload of google/ddpm-cifar10-32, may still use them. Same [C, C] matrices.
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ---------------------------------------------------------------------------------------------
# The network's layout


def check_convertible(config: UNetConfig) -> None:
    """Raise ValueError naming the setting when `config` has no UNet2DModel equivalent."""
    if config.ch_mult[0] != 1:
        raise ValueError(
            f"ch_mult={list(config.ch_mult)}: diffusers' UNet2DModel keeps conv_in's width in its "
            "first block, so only configs with ch_mult[0] == 1 convert"
        )


def module_pairs(config: UNetConfig) -> list[tuple[str, str, str]]:
    """(our module path, diffusers' module path, kind) of every module that holds parameters,
    walking both networks in the same order (see ddpm/nn/unet.py for ours)."""
    check_convertible(config)
    levels = len(config.ch_mult)
    pairs = [
        ("temb.0", "time_embedding.linear_1", _PLAIN),
        ("temb.2", "time_embedding.linear_2", _PLAIN),
        ("conv_in", "conv_in", _PLAIN),
    ]
    index = 0
    for level in range(levels):
        attn = config.image_size // 2**level in config.attn_resolutions
        for j in range(config.num_res_blocks):
            pairs.append((f"down.{index}.res", f"down_blocks.{level}.resnets.{j}", _RES))
            if attn:
                pairs.append((f"down.{index}.attn", f"down_blocks.{level}.attentions.{j}", _ATTN))
            index += 1
        if level != levels - 1:
            pairs.append((f"down.{index}.conv", f"down_blocks.{level}.downsamplers.0.conv", _PLAIN))
            index += 1
    pairs += [
        ("mid.0.res", "mid_block.resnets.0", _RES),
        ("mid.0.attn", "mid_block.attentions.0", _ATTN),
        ("mid.1.res", "mid_block.resnets.1", _RES),
    ]
    index = 0
    for block, level in enumerate(reversed(range(levels))):
        attn = config.image_size // 2**level in config.attn_resolutions
        for j in range(config.num_res_blocks + 1):
            pairs.append((f"up.{index}.res", f"up_blocks.{block}.resnets.{j}", _RES))
            if attn:
                pairs.append((f"up.{index}.attn", f"up_blocks.{block}.attentions.{j}", _ATTN))
            index += 1
        if level != 0:
            pairs.append((f"up.{index}.conv", f"up_blocks.{block}.upsamplers.0.conv", _PLAIN))
            index += 1
    pairs += [("norm_out", "conv_norm_out", _PLAIN), ("conv_out", "conv_out", _PLAIN)]
    return pairs


def _rename(
    state: Mapping[str, Tensor], config: UNetConfig, to_diffusers: bool, progress: bool
) -> dict[str, Tensor]:
    pairs = module_pairs(config)
    # module path on the source side -> (module path on the target side, kind)
    modules = {
        (ours if to_diffusers else theirs): (theirs if to_diffusers else ours, kind)
        for ours, theirs, kind in pairs
    }
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key in tqdm(list(state), desc="converting", unit="tensor", disable=not progress):
        module, leaf, param = _split_key(key, modules)
        if module is None:
            unknown.append(key)
            continue
        target, kind = modules[module]
        tensor = state[key].detach()
        if kind == _PLAIN:
            out[f"{target}.{leaf}.{param}" if leaf else f"{target}.{param}"] = tensor
            continue
        names = _LEAVES[kind] if to_diffusers else {v: k for k, v in _LEAVES[kind].items()}
        if not to_diffusers and kind == _ATTN:
            leaf = _LEGACY_ATTN.get(leaf, leaf)
        if leaf not in names:
            unknown.append(key)
            continue
        ours_leaf = leaf if to_diffusers else names[leaf]
        if kind == _ATTN and ours_leaf in _ATTN_PROJECTIONS and param == "weight":
            # 1x1 convolution <-> linear layer: the same matrix.
            shape = tuple(tensor.shape[:2]) if to_diffusers else (*tensor.shape[:2], 1, 1)
            tensor = tensor.reshape(shape)
        out[f"{target}.{names[leaf]}.{param}"] = tensor
    if unknown:
        side = "ddpm U-Net" if to_diffusers else "diffusers UNet2DModel"
        raise ValueError(
            f"{len(unknown)} tensor(s) have no place in the {side} of this layout "
            f"(config {_describe(config)}), e.g. {unknown[:5]}"
        )
    return out


def _split_key(key: str, modules: Mapping[str, Any]) -> tuple[str | None, str, str]:
    """(module path, leaf module name, parameter name) of a state-dict key, the module path being
    the longest dotted prefix listed in `modules`."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in modules:
            return module, ".".join(parts[cut:-1]), parts[-1]
    return None, "", parts[-1]


def _describe(config: UNetConfig) -> str:
    return (
        f"ch={config.ch}, ch_mult={list(config.ch_mult)}, num_res_blocks={config.num_res_blocks}, "
        f"attn_resolutions={list(config.attn_resolutions)}, image_size={config.image_size}"
    )


def to_diffusers_state_dict(
    state: Mapping[str, Tensor], config: UNetConfig, progress: bool = False
) -> dict[str, Tensor]:
    """Our U-Net's state dict under diffusers' UNet2DModel names (attention weights as [C, C])."""
    return _rename(state, config, to_diffusers=True, progress=progress)


def from_diffusers_state_dict(
    state: Mapping[str, Tensor], config: UNetConfig, progress: bool = False
) -> dict[str, Tensor]:
    """A UNet2DModel state dict under our names, for a `UNet` built from `config`."""
    return _rename(state, config, to_diffusers=False, progress=progress)


# ---------------------------------------------------------------------------------------------
# Configs


def diffusers_unet_config(config: UNetConfig) -> dict[str, Any]:
    """The UNet2DModel config (config.json) of the network `config` describes."""
    check_convertible(config)
    levels = range(len(config.ch_mult))
    attn = [config.image_size // 2**level in config.attn_resolutions for level in levels]
    return {
        "_class_name": "UNet2DModel",
        "sample_size": config.image_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "norm_num_groups": config.num_groups,
        # None: one attention head of all the channels (an int would be the width of a head).
        "attention_head_dim": None,
        "dropout": float(config.dropout),
        **{key: value for key, (value, _) in _FIXED_LAYOUT.items()},
    }


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """The `UNetConfig` of a UNet2DModel config; ValueError listing every setting we cannot run."""
    get = {key: config.get(key, default) for key, default in _UNET_DEFAULTS.items()}
    malformed = _unet_type_problems(get)
    if malformed:
        raise ValueError("UNet2DModel config not convertible: " + "; ".join(malformed))
    problems = [
        f"{key}={short_repr(get[key])} (needs {value!r}: {why})"
        for key, (value, why) in _FIXED_LAYOUT.items()
        if get[key] != value
    ]
    channels = list(get["block_out_channels"])
    down, up = list(get["down_block_types"]), list(get["up_block_types"])
    ch = channels[0]
    if any(c % ch for c in channels):
        problems.append(f"block_out_channels={channels} (each must be a multiple of the first)")
    if len(down) != len(channels) or len(up) != len(channels):
        problems.append(
            f"down_block_types/up_block_types have {len(down)}/{len(up)} entries for "
            f"{len(channels)} block_out_channels"
        )
    bad = [t for t in down if t not in ("DownBlock2D", "AttnDownBlock2D")]
    if bad:
        problems.append(f"down_block_types {bad} (only DownBlock2D and AttnDownBlock2D)")
    mirrored = [t.replace("Down", "Up") for t in reversed(down)]
    if up != mirrored:
        problems.append(f"up_block_types={up} (must mirror the down blocks: {mirrored})")
    head = get["attention_head_dim"]
    attn_widths = [c for c, t in zip(channels, down, strict=False) if t == "AttnDownBlock2D"]
    if head is not None and any(c != head for c in [*attn_widths, channels[-1]]):
        problems.append(
            f"attention_head_dim={head} (gives several heads; this U-Net's attention has one "
            "head: null, or the width of every attention layer)"
        )
    if get["attn_norm_num_groups"] not in (None, get["norm_num_groups"]):
        problems.append(f"attn_norm_num_groups={get['attn_norm_num_groups']} (must be null)")
    if get["time_embedding_dim"] not in (None, 4 * ch):
        problems.append(f"time_embedding_dim={get['time_embedding_dim']} (must be 4 x {ch})")
    size = get["sample_size"]
    if isinstance(size, (list, tuple)):
        size = size[0]
    in_ch, out_ch = get["in_channels"], get["out_channels"]
    if out_ch not in (in_ch, 2 * in_ch):
        problems.append(
            f"out_channels={out_ch} (must be in_channels={in_ch}, or twice that for learned "
            "variances)"
        )
    if problems:
        raise ValueError("UNet2DModel config not convertible: " + "; ".join(problems))
    attn_resolutions = tuple(size // 2**i for i, t in enumerate(down) if t == "AttnDownBlock2D")
    return UNetConfig(
        image_size=size,
        in_channels=in_ch,
        out_channels=out_ch,
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=int(get["layers_per_block"]),
        attn_resolutions=attn_resolutions,
        dropout=float(get["dropout"]),
        num_groups=int(get["norm_num_groups"]),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unet_type_problems(get: Mapping[str, Any]) -> list[str]:
    """The UNet2DModel settings of the wrong type or out of this library's bounds (see
    `ddpm.nn.unet.LIMITS`), checked before any is used: a config.json may be crafted."""
    problems = []

    def bounded_int(key: str, low: int, high: int, *, optional: bool = False) -> None:
        value = get[key]
        if optional and value is None:
            return
        if not _is_int(value) or not low <= value <= high:
            kind = "null or an integer" if optional else "an integer"
            problems.append(f"{key}={short_repr(value)} (must be {kind} in [{low}, {high}])")

    channels = get["block_out_channels"]
    widest = MAX_CH * MAX_CH_MULT
    if (
        not isinstance(channels, (list, tuple))
        or not 1 <= len(channels) <= MAX_LEVELS
        or not all(_is_int(c) and 1 <= c <= widest for c in channels)
    ):
        problems.append(
            f"block_out_channels={short_repr(channels)} (must be a list of 1 to {MAX_LEVELS} "
            f"integers in [1, {widest}])"
        )
    for key in ("down_block_types", "up_block_types"):
        value = get[key]
        if (
            not isinstance(value, (list, tuple))
            or len(value) > MAX_LEVELS
            or not all(isinstance(t, str) and len(t) <= 64 for t in value)
        ):
            problems.append(
                f"{key}={short_repr(value)} (must be a list of at most {MAX_LEVELS} block names)"
            )
    size = get["sample_size"]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not _is_int(size) or not 1 <= size <= MAX_IMAGE_SIZE:
        problems.append(
            f"sample_size={short_repr(get['sample_size'])} (must be a square image size: an "
            f"integer in [1, {MAX_IMAGE_SIZE}])"
        )
    bounded_int("layers_per_block", 1, MAX_RES_BLOCKS)
    bounded_int("in_channels", 1, MAX_IMAGE_CHANNELS)
    bounded_int("out_channels", 1, 2 * MAX_IMAGE_CHANNELS)
    bounded_int("norm_num_groups", 1, MAX_CH)
    bounded_int("attention_head_dim", 1, widest, optional=True)
    bounded_int("attn_norm_num_groups", 1, MAX_CH, optional=True)
    bounded_int("time_embedding_dim", 1, 4 * MAX_CH, optional=True)
    dropout = get["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        problems.append(f"dropout={short_repr(dropout)} (must be a number in [0, 1))")
    return problems


def model_config_for(unet: UNetConfig) -> ModelConfig:
    """The `ModelConfig` (a named config plus the fewest overrides) that builds `unet`."""
    learn_sigma = unet.out_channels == 2 * unet.in_channels
    derived = dataclasses.asdict(unet)
    best: ModelConfig | None = None
    for name in UNET_CONFIGS:
        try:
            named = dataclasses.asdict(
                ModelConfig(name, unet.image_size, unet.in_channels).unet_config(learn_sigma)
            )
        except ValueError:  # e.g. the named attention sizes never occur at this image size
            named = dict(UNET_CONFIGS[name])
        overrides = {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in derived.items()
            if key not in ("image_size", "in_channels", "out_channels")
            and _tuple_or_value(named.get(key)) != _tuple_or_value(value)
        }
        candidate = ModelConfig(name, unet.image_size, unet.in_channels, overrides)
        try:
            if candidate.unet_config(learn_sigma) != unet:
                continue
        except ValueError:
            continue
        if best is None or len(overrides) < len(best.overrides):
            best = candidate
    if best is None:  # every field is overridable, so the first name always fits
        raise ValueError(f"no ModelConfig builds {unet}")
    return best


def _tuple_or_value(value: Any) -> Any:
    # Configs read from JSON hold lists where the dataclasses hold tuples.
    return tuple(value) if isinstance(value, list) else value


def scheduler_config(config: DiffusionConfig) -> dict[str, Any]:
    """The DDPMScheduler config (scheduler_config.json) of our diffusion process."""
    out: dict[str, Any] = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": config.num_timesteps,
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "beta_schedule": _SCHEDULE_TO_DIFFUSERS.get(config.schedule, "linear"),
        "trained_betas": None,
        "variance_type": _VARIANCE_TO_DIFFUSERS[config.var_type],
        "prediction_type": _PREDICTION_TO_DIFFUSERS[config.mean_type],
        # Our sampler clips x̂0 to [-1, 1] by default, as the official one does.
        "clip_sample": True,
        "clip_sample_range": 1.0,
    }
    if config.schedule not in _SCHEDULE_TO_DIFFUSERS:
        out["trained_betas"] = make_betas(
            config.schedule, config.num_timesteps, config.beta_start, config.beta_end
        ).tolist()
    return out


def diffusion_config_from_scheduler(config: Mapping[str, Any]) -> DiffusionConfig:
    """Our `DiffusionConfig` of a DDPMScheduler config (loss: L_simple, or the hybrid loss for
    learned variances, since diffusers does not record the training loss)."""
    get = {key: config.get(key, default) for key, default in _SCHEDULER_DEFAULTS.items()}
    name = config.get("_class_name", "DDPMScheduler")
    problems = []
    steps = get["num_train_timesteps"]
    if not _is_int(steps) or not 1 <= steps <= MAX_TIMESTEPS:
        problems.append(
            f"num_train_timesteps={short_repr(steps)} (must be an integer in [1, {MAX_TIMESTEPS}])"
        )
    for key in ("beta_start", "beta_end"):
        value = get[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}={short_repr(value)} (must be a number)")
    for key in ("beta_schedule", "variance_type", "prediction_type"):
        if not isinstance(get[key], str):
            problems.append(f"{key}={short_repr(get[key])} (must be a string)")
    betas = get["trained_betas"]
    if betas is not None and (
        not isinstance(betas, list)
        or not 1 <= len(betas) <= MAX_TIMESTEPS
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
    ):
        problems.append(
            f"trained_betas={short_repr(betas)} (must be null or a list of 1 to "
            f"{MAX_TIMESTEPS} numbers)"
        )
    if problems:
        raise ValueError("DDPMScheduler config not convertible: " + "; ".join(problems))
    if name != "DDPMScheduler":
        problems.append(f"_class_name={short_repr(name)} (a DDPMScheduler config is needed)")
    if get["rescale_betas_zero_snr"]:
        problems.append("rescale_betas_zero_snr=true (changes the betas)")
    variance = _VARIANCE_FROM_DIFFUSERS.get(get["variance_type"])
    if variance is None:
        problems.append(
            f"variance_type={short_repr(get['variance_type'])} "
            f"(allowed: {sorted(_VARIANCE_FROM_DIFFUSERS)})"
        )
    mean = {v: k for k, v in _PREDICTION_TO_DIFFUSERS.items()}.get(get["prediction_type"])
    if mean is None:
        problems.append(
            f"prediction_type={short_repr(get['prediction_type'])} "
            f"(allowed: {sorted(_PREDICTION_TO_DIFFUSERS.values())})"
        )
    start, end = float(get["beta_start"]), float(get["beta_end"])
    if get["trained_betas"] is not None:
        schedule, start, end = _match_betas(np.asarray(get["trained_betas"], dtype=np.float64))
        if schedule is None:
            problems.append(f"trained_betas (match none of ddpm's schedules {list(SCHEDULES)})")
    else:
        by_name = {v: k for k, v in _SCHEDULE_TO_DIFFUSERS.items()}
        schedule = by_name.get(get["beta_schedule"])
        if schedule is None:
            problems.append(
                f"beta_schedule={short_repr(get['beta_schedule'])} (allowed: {sorted(by_name)})"
            )
    if problems:
        raise ValueError("DDPMScheduler config not convertible: " + "; ".join(problems))
    return DiffusionConfig(
        schedule=schedule,
        num_timesteps=steps,
        beta_start=start,
        beta_end=end,
        mean_type=mean,
        var_type=variance,
        loss_type="hybrid" if variance == "learned_range" else "simple",
    )


def _match_betas(betas: np.ndarray) -> tuple[str | None, float, float]:
    """The schedule (and end points) of ours that gives `betas`, or (None, ...)."""
    start, end = float(betas[0]), float(betas[-1])
    defaults = DiffusionConfig()
    # constant first: equal betas are also a linear schedule from β to β, but we export only
    # the constant schedule as trained_betas.
    for name in sorted(SCHEDULES, key=lambda n: n != "constant"):
        # cosine ignores the end points; constant has β = beta_end throughout.
        lo, hi = (
            (defaults.beta_start, defaults.beta_end)
            if name == "cosine"
            else (end, end)
            if name == "constant"
            else (start, end)
        )
        try:
            candidate = make_betas(name, len(betas), lo, hi)
        except ValueError:
            continue
        if np.allclose(candidate, betas, rtol=1e-6, atol=1e-9):
            return name, lo, hi
    return None, start, end


# ---------------------------------------------------------------------------------------------
# Files


def export_diffusers(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = False
) -> Path:
    """Write the EMA weights of `checkpoint` (an EMA export or a full checkpoint) as a diffusers
    folder: config.json, diffusion_pytorch_model.safetensors, scheduler_config.json."""
    safetensors_torch = _safetensors()
    # Everything read from the checkpoint is checked here: any failure is one CheckpointError
    # naming the file, the same error `ddpm sample` reports for it.
    with reading_checkpoint(checkpoint):
        model, _, meta = load_ema_model(checkpoint, "cpu")
        # The whole config goes into config.json: its train section is not checked by the
        # loader, and a crafted one could be a list of shared references no walk finishes.
        check_tree(meta["config"], f"{checkpoint}: config")
        model_config, diffusion_config = configs_of(meta["config"])
        weights = to_diffusers_state_dict(model.state_dict(), model.config, progress=progress)
        # safetensors refuses views that share storage; every tensor gets its own copy.
        weights = {key: value.contiguous().clone() for key, value in weights.items()}
        config = diffusers_unet_config(model.config)
        config[PROVENANCE_KEY] = {
            "config": _plain(meta["config"]),
            "step": int(meta["step"]),
            "source": str(Path(checkpoint).name),
        }
        scheduler = scheduler_config(diffusion_config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / UNET_WEIGHTS, "wb") as handle:
        handle.write(safetensors_torch.save(weights, metadata={"format": "pt"}))
    write_json(out / UNET_CONFIG, config)
    write_json(out / SCHEDULER_CONFIG, scheduler)
    return out


def import_diffusers(
    src_dir: str | os.PathLike, out_path: str | os.PathLike, *, progress: bool = False
) -> Path:
    """Convert a diffusers UNet2DModel folder (flat or a pipeline's unet/ + scheduler/) into an
    EMA export at `out_path`; returns `out_path`.

    Every setting is checked against this library's bounds before a tensor exists, and the
    weights must be finite floating-point tensors; anything wrong is one `InputError` naming
    the file (a missing folder: FileNotFoundError)."""
    src = Path(src_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"diffusers folder not found: {src}")
    with reading(src, "diffusers UNet2DModel folder"):
        model, config, step, meta = _import_model(src, progress)
    return export_ema(
        out_path, {"step": step, "ema": model.state_dict(), "config": config}, meta=meta
    )


def _import_model(src: Path, progress: bool) -> tuple[torch.nn.Module, dict, int, dict]:
    unet_dir = src if (src / UNET_CONFIG).is_file() else src / "unet"
    if not (unet_dir / UNET_CONFIG).is_file():
        raise FileNotFoundError(
            f"no {UNET_CONFIG} in {src} or {src / 'unet'}: not a diffusers UNet2DModel folder"
        )
    unet_json = _read_json(unet_dir / UNET_CONFIG)
    if unet_json.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(
            f"{unet_dir / UNET_CONFIG}: _class_name {short_repr(unet_json['_class_name'])}, "
            "expected 'UNet2DModel'"
        )
    try:
        unet = unet_config_from_diffusers(unet_json)
    except ValueError as err:
        raise ValueError(f"{unet_dir / UNET_CONFIG}: {err}") from None

    scheduler_path = next(
        (
            p
            for p in (
                unet_dir / SCHEDULER_CONFIG,
                src / SCHEDULER_CONFIG,
                src / "scheduler" / SCHEDULER_CONFIG,
            )
            if p.is_file()
        ),
        None,
    )
    if scheduler_path is None:
        raise FileNotFoundError(
            f"no {SCHEDULER_CONFIG} in {src} (or its scheduler/ folder): the β schedule is needed "
            "to sample and to score the model"
        )
    scheduler_json = _read_json(scheduler_path)
    try:
        diffusion = diffusion_config_from_scheduler(scheduler_json)
    except ValueError as err:
        raise ValueError(f"{scheduler_path}: {err}") from None
    learn_sigma = unet.out_channels == 2 * unet.in_channels
    if learn_sigma != (diffusion.var_type == "learned_range"):
        raise ValueError(
            f"{unet_dir / UNET_CONFIG} has out_channels={unet.out_channels} for "
            f"in_channels={unet.in_channels} but {scheduler_path} has variance_type "
            f"{diffusion.var_type!r}: twice the channels go with learned_range only"
        )

    model_config = model_config_for(unet)
    config: dict[str, Any] = {
        "model": dataclasses.asdict(model_config),
        "diffusion": dataclasses.asdict(diffusion),
        "train": None,
        "seed": None,
    }
    step = 0
    provenance = unet_json.get(PROVENANCE_KEY)
    if _provenance_fits(provenance, unet, diffusion):
        config, step = provenance["config"], int(provenance.get("step", 0))

    state = _read_weights(unet_dir)
    model = model_config.build(learn_sigma=learn_sigma)
    try:
        model.load_state_dict(from_diffusers_state_dict(state, unet, progress=progress))
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"{unet_dir}: the weights do not fit the network its {UNET_CONFIG} describes: {first}"
        ) from None
    meta = {"source": "diffusers", "from": str(src), "diffusers_config": _plain(unet_json)}
    return model, config, step, meta


def _provenance_fits(provenance: Any, unet: UNetConfig, diffusion: DiffusionConfig) -> bool:
    """Whether the "_ddpm" entry describes the network and chain that diffusers' configs do."""
    if not isinstance(provenance, Mapping) or not isinstance(provenance.get("config"), Mapping):
        return False
    try:
        model_config, ours = configs_of(provenance["config"])
        built = model_config.unet_config(unet.out_channels == 2 * unet.in_channels)
    except (TypeError, ValueError, KeyError):
        return False
    carried = ("num_timesteps", "mean_type", "var_type")
    same_chain = all(getattr(ours, k) == getattr(diffusion, k) for k in carried) and np.allclose(
        make_betas(ours.schedule, ours.num_timesteps, ours.beta_start, ours.beta_end),
        make_betas(
            diffusion.schedule, diffusion.num_timesteps, diffusion.beta_start, diffusion.beta_end
        ),
    )
    return dataclasses.replace(built, use_checkpoint=False) == unet and same_chain


# Largest config.json / scheduler_config.json read: a real one is a few KB (trained_betas for
# MAX_TIMESTEPS steps about 2 MB).
MAX_JSON_BYTES = 8 << 20


def _read_json(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise InputError(f"{path}: {size:,} bytes; a config file is at most {MAX_JSON_BYTES:,}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    check_tree(data, str(path))
    return data


def _checked_weights(state: Any, path: Path) -> dict[str, Tensor]:
    """`state` when it is a mapping of names to finite floating-point tensors; else InputError
    naming the file and the tensor. (fp16 or bf16 weights, as diffusers' variants store them,
    are fine: loading casts them to the model's float32.)"""
    if not isinstance(state, Mapping):
        raise InputError(f"{path}: expected a state dict, got {type(state).__name__}")
    for name, tensor in state.items():
        label = short_repr(name)
        if not isinstance(tensor, Tensor):
            raise InputError(f"{path}: tensor {label} is a {type(tensor).__name__}, not a tensor")
        if not tensor.is_floating_point():
            raise InputError(
                f"{path}: tensor {label} has dtype {tensor.dtype}, not a floating-point dtype"
            )
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise InputError(
                f"{path}: tensor {label} has {bad} NaN or Inf value(s) of {tensor.numel()}"
            )
    return dict(state)


def _read_weights(folder: Path) -> dict[str, Tensor]:
    if (folder / UNET_WEIGHTS).is_file():
        path = folder / UNET_WEIGHTS
        try:
            state = _safetensors().load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error type for a bad header
            raise InputError(f"{path}: not a readable safetensors file ({err})") from None
        return _checked_weights(state, path)
    if (folder / UNET_WEIGHTS_BIN).is_file():
        path = folder / UNET_WEIGHTS_BIN
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise InputError(f"{path}: not a readable torch state dict ({err})") from None
        return _checked_weights(state, path)
    raise FileNotFoundError(f"no {UNET_WEIGHTS} or {UNET_WEIGHTS_BIN} in {folder}")


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:
        raise RuntimeError(
            f"the diffusers format stores weights as safetensors: pip install safetensors ({err})"
        ) from None
    return safetensors.torch


def _plain(value: Any) -> Any:
    """JSON-ready copy of a config tree (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
