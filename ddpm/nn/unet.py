"""The DDPM noise-prediction U-Net (Ho et al. 2020, Appendix B) and its named configurations.

Architecture, as the official diffusion_tf/models/unet.py builds it:

    t -> sinusoidal(ch) -> Dense(4ch) -> swish -> Dense(4ch) = temb   (used by every ResBlock)
    x -> conv3x3(ch)
    down:  per level, num_res_blocks ResBlocks (+ attention if the level's side is listed in
           attn_resolutions), then a stride-2 conv except after the last level
    mid:   ResBlock, attention, ResBlock at the lowest resolution
    up:    per level, num_res_blocks + 1 ResBlocks, each fed the concatenation of the running
           feature map and one stored down-path activation (+ attention as above), then
           nearest x2 + conv3x3 except after the first level
    out:   GroupNorm -> swish -> conv3x3(out_channels), zero-initialised

Parameter counts (in_channels 3, learn_sigma False), checked by tests/test_unet.py:
    cifar10 at 32 px:      35,746,307  (the official count, exactly)
    celebahq256 at 256 px: 113,673,219 (the paper's "114M" is this number rounded)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ddpm.errors import short_repr
from ddpm.nn.layers import (
    AttnBlock,
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
    mark_zero_init,
    timestep_embedding,
)

# Named configurations. "cifar10" and "celebahq256" are the paper's. "small" and "tiny" are ours,
# for 28-32 px images on a CPU: GroupNorm groups are cut so that every group still spans at least
# four channels at the widest-resolution level (GroupNorm(32) on 32 channels would be per-channel
# instance norm). Their attention resolutions list both the 32 px (16) and the 28 px / MNIST (14)
# half-resolution levels; build_unet keeps those that occur at the requested image size.
UNET_CONFIGS: dict[str, dict] = {
    "cifar10": dict(
        ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
    ),
    "celebahq256": dict(
        ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0
    ),
    # Minutes of CPU training underfit rather than overfit, so no dropout.
    "small": dict(
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16, 14),
        dropout=0.0,
        num_groups=8,
    ),
    # For unit tests: attention only in the middle block, so any even image size works.
    "tiny": dict(
        ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=4
    ),
}


# Bounds on a UNetConfig, checked before any layer exists, so that a crafted checkpoint or
# diffusers config.json cannot make a loader allocate gigabytes (ch=32768 alone asks 17 GiB).
# Generous for real models: the paper's celebahq256 (256 px, ch 128, ch_mult up to 4, 6 levels,
# 114M parameters) is far inside every one.
MAX_IMAGE_SIZE = 1024
MAX_IMAGE_CHANNELS = 64
MAX_CH = 1024
MAX_CH_MULT = 16
MAX_LEVELS = 8
MAX_RES_BLOCKS = 16
MAX_PARAMETERS = 1_000_000_000
LIMITS = {
    "image_size": MAX_IMAGE_SIZE,
    "in_channels": MAX_IMAGE_CHANNELS,
    "out_channels": 2 * MAX_IMAGE_CHANNELS,
    "ch": MAX_CH,
    "num_res_blocks": MAX_RES_BLOCKS,
}


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a UNet; `asdict(config)` is what checkpoints should store."""

    image_size: int
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = field(default=(16,))
    dropout: float = 0.1
    num_groups: int = 32
    # Recompute block activations in the backward pass: less memory, about 30% more compute.
    use_checkpoint: bool = False

    def __post_init__(self):
        # A config may come from a file someone else wrote (a checkpoint, a diffusers
        # config.json): every type and bound is checked before anything walks a list or builds
        # a layer, and no message echoes a value whole (see `ddpm.errors`).
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ValueError(
                    f"UNet {name} must be a list of positive integers, got {short_repr(value)}"
                )
        if len(self.ch_mult) > MAX_LEVELS or len(self.attn_resolutions) > MAX_LEVELS:
            raise ValueError(
                f"UNet ch_mult and attn_resolutions may list at most {MAX_LEVELS} levels, got "
                f"{len(self.ch_mult)} and {len(self.attn_resolutions)}"
            )
        # Lists from YAML/JSON become tuples so the config stays hashable and comparable.
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        for name in ("image_size", "in_channels", "out_channels", "ch", "num_res_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UNet {name} must be a positive integer, got {short_repr(value)}")
            if value > LIMITS[name]:
                raise ValueError(
                    f"UNet {name}={value} is over this library's limit of {LIMITS[name]}"
                )
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int):
            raise ValueError(
                f"UNet num_groups must be a positive integer, got {short_repr(self.num_groups)}"
            )
        if self.num_groups < 1 or self.ch % self.num_groups:
            raise ValueError(
                f"UNet ch={self.ch} must be divisible by num_groups={self.num_groups} "
                "(GroupNorm splits every layer's channels into num_groups equal groups)"
            )
        if self.ch < 4:
            raise ValueError(f"UNet ch must be >= 4 for the timestep embedding, got {self.ch}")
        if not self.ch_mult or not all(
            isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= MAX_CH_MULT
            for m in self.ch_mult
        ):
            raise ValueError(
                f"UNet ch_mult must be a non-empty list of integers in [1, {MAX_CH_MULT}], got "
                f"{short_repr(self.ch_mult)}"
            )
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in self.attn_resolutions):
            raise ValueError(
                "UNet attn_resolutions must be a list of integers, got "
                f"{short_repr(self.attn_resolutions)}"
            )
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"UNet image_size={self.image_size} cannot be halved {len(self.ch_mult) - 1} "
                f"times evenly for ch_mult={self.ch_mult}: it must be a multiple of {factor}"
            )
        allowed = self.resolutions
        bad = [r for r in self.attn_resolutions if r not in allowed]
        if bad:
            raise ValueError(
                f"UNet attn_resolutions {bad} never occur at image_size={self.image_size} with "
                f"ch_mult={self.ch_mult}; the levels' resolutions are {list(allowed)}"
            )
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= float(self.dropout) < 1.0
        ):
            raise ValueError(f"UNet dropout must be in [0, 1), got {short_repr(self.dropout)}")
        if not isinstance(self.use_checkpoint, bool):
            raise ValueError(
                f"UNet use_checkpoint must be true or false, got {short_repr(self.use_checkpoint)}"
            )
        count = parameter_count(self)
        if count > MAX_PARAMETERS:
            raise ValueError(
                f"UNet of {count:,} parameters (ch={self.ch}, ch_mult={list(self.ch_mult)}, "
                f"num_res_blocks={self.num_res_blocks}) is over this library's limit of "
                f"{MAX_PARAMETERS:,}"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the network denoises."""
        return (self.in_channels, self.image_size, self.image_size)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map side length at each level, from the input down."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))


def parameter_count(config: UNetConfig) -> int:
    """The number of parameters `UNet(config)` has, by arithmetic (nothing is allocated): the
    same walk as `UNet.__init__`, layer by layer."""
    c = config
    temb = 4 * c.ch

    def res(i: int, o: int) -> int:
        skip = i * o + o if i != o else 0
        return 2 * i + (9 * i * o + o) + (temb * o + o) + 2 * o + (9 * o * o + o) + skip

    def attn(ch: int) -> int:
        return 2 * ch + 4 * (ch * ch + ch)

    def conv3(ch: int) -> int:
        return 9 * ch * ch + ch

    total = (c.ch * temb + temb) + (temb * temb + temb) + (9 * c.in_channels * c.ch + c.ch)
    skips = [c.ch]
    cur, size = c.ch, c.image_size
    for level, mult in enumerate(c.ch_mult):
        for _ in range(c.num_res_blocks):
            total += res(cur, c.ch * mult) + (
                attn(c.ch * mult) if size in c.attn_resolutions else 0
            )
            cur = c.ch * mult
            skips.append(cur)
        if level != len(c.ch_mult) - 1:
            total += conv3(cur)
            skips.append(cur)
            size //= 2
    total += 2 * res(cur, cur) + attn(cur)
    for level, mult in reversed(list(enumerate(c.ch_mult))):
        for _ in range(c.num_res_blocks + 1):
            out = c.ch * mult
            total += res(cur + skips.pop(), out) + (attn(out) if size in c.attn_resolutions else 0)
            cur = out
        if level != 0:
            total += conv3(cur)
            size *= 2
    return total + 2 * cur + (9 * cur * c.out_channels + c.out_channels)


class ResAttnBlock(nn.Module):
    """A ResBlock optionally followed by attention: one unit of the down, middle and up paths."""

    def __init__(self, res: ResBlock, attn: AttnBlock | None, use_checkpoint: bool):
        super().__init__()
        self.res = res
        self.attn = attn
        self.use_checkpoint = use_checkpoint

    def _forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.res(x, temb)
        return self.attn(h) if self.attn is not None else h

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing restores the RNG state, so dropout masks match.
            return checkpoint(self._forward, x, temb, use_reentrant=False)
        return self._forward(x, temb)


class UNet(nn.Module):
    """eps_theta(x_t, t): forward(x [N,C,H,W], t [N] 0-based steps) -> [N, out_channels, H, W]."""

    def __init__(self, config: UNetConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        c = config
        temb_ch = 4 * c.ch

        def unit(in_ch: int, out_ch: int, resolution: int, attn: bool) -> ResAttnBlock:
            res = ResBlock(in_ch, out_ch, temb_ch, c.dropout, c.num_groups)
            attn_block = AttnBlock(out_ch, c.num_groups, resolution) if attn else None
            return ResAttnBlock(res, attn_block, c.use_checkpoint)

        self.temb = nn.Sequential(nn.Linear(c.ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)

        # Down path; skip_chs records the channels of every activation the up path will concat.
        self.down = nn.ModuleList()
        skip_chs = [c.ch]
        cur, res = c.ch, c.image_size
        for level, mult in enumerate(c.ch_mult):
            for _ in range(c.num_res_blocks):
                self.down.append(unit(cur, c.ch * mult, res, res in c.attn_resolutions))
                cur = c.ch * mult
                skip_chs.append(cur)
            if level != len(c.ch_mult) - 1:
                self.down.append(Downsample(cur))
                skip_chs.append(cur)
                res //= 2

        # The official net always has attention in the middle, whatever attn_resolutions says.
        self.mid = nn.ModuleList([unit(cur, cur, res, True), unit(cur, cur, res, False)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.ch_mult))):
            for _ in range(c.num_res_blocks + 1):
                in_ch = cur + skip_chs.pop()
                cur = c.ch * mult
                self.up.append(unit(in_ch, cur, res, res in c.attn_resolutions))
            if level != 0:
                self.up.append(Upsample(cur))
                res *= 2
        assert not skip_chs and res == c.image_size, "down and up paths must mirror each other"

        self.norm_out = group_norm(c.num_groups, cur)
        self.conv_out = mark_zero_init(nn.Conv2d(cur, c.out_channels, 3, padding=1))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The official init: Xavier-uniform (fan_avg) weights, zero biases, zero output layers.

        Modules are visited in registration order, so one generator seed gives one network.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if getattr(m, "zero_init", False):
                    nn.init.zeros_(m.weight)
                else:
                    nn.init.xavier_uniform_(m.weight, generator=generator)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"UNet input must be [N, {c.in_channels}, H, W], got {tuple(x.shape)}")
        factor = 2 ** (len(c.ch_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"UNet input height and width must be multiples of {factor}, got {tuple(x.shape)}"
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(
                f"UNet t must be a scalar or have shape [{x.shape[0]}], got {tuple(t.shape)}"
            )

        temb = self.temb(timestep_embedding(t, c.ch))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else layer(h, temb)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, temb)
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = layer(torch.cat([h, hs.pop()], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def config_dict(self) -> dict:
        """Plain-Python config (tuples as lists) for checkpoints, MLflow params and JSON."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()}


@dataclass(frozen=True)
class ModelConfig:
    """A named configuration (`UNET_CONFIGS`) at one image shape, plus field overrides.

    Plain data: checkpoints store `asdict(model_config)` and rebuild the network from it.
    """

    name: str = "cifar10"
    image_size: int = 32
    in_channels: int = 3
    overrides: dict = field(default_factory=dict)

    def unet_config(self, learn_sigma: bool = False) -> UNetConfig:
        """The full UNetConfig; ValueError naming the config, override or size that is wrong.

        learn_sigma doubles the output channels for the learned-range variance of
        improved-diffusion.
        """
        if not isinstance(self.name, str) or self.name not in UNET_CONFIGS:
            raise ValueError(
                f"unknown UNet config {short_repr(self.name)}; allowed: {sorted(UNET_CONFIGS)}"
            )
        allowed = sorted(OVERRIDABLE)
        if not isinstance(self.overrides, Mapping) or not all(
            isinstance(key, str) for key in self.overrides
        ):
            raise ValueError(
                f"UNet overrides must be a mapping of field names to values, got "
                f"{short_repr(self.overrides)}"
            )
        unknown = sorted(set(self.overrides) - OVERRIDABLE)
        if unknown:
            raise ValueError(f"unknown UNet override(s) {short_repr(unknown)}; allowed: {allowed}")
        settings = {**UNET_CONFIGS[self.name], **self.overrides}
        if "attn_resolutions" not in self.overrides:
            # A named config's attention list may name several candidate sizes (see
            # UNET_CONFIGS); keep those that occur, but never silently drop all the attention
            # the config asked for.
            wanted = settings["attn_resolutions"]
            probe = UNetConfig(self.image_size, **{**settings, "attn_resolutions": ()})
            settings["attn_resolutions"] = tuple(r for r in wanted if r in probe.resolutions)
            if wanted and not settings["attn_resolutions"]:
                raise ValueError(
                    f"UNet config {self.name!r} puts attention at {wanted}, but at "
                    f"image_size={self.image_size} the resolutions are "
                    f"{list(probe.resolutions)}; pass attn_resolutions explicitly "
                    "(() for attention in the middle block only)"
                )
        return UNetConfig(
            image_size=self.image_size,
            in_channels=self.in_channels,
            out_channels=self.in_channels * (2 if learn_sigma else 1),
            **settings,
        )

    def build(self, learn_sigma: bool = False, seed: int | None = None) -> UNet:
        """The network. `seed` makes the initialisation reproducible without touching the global
        RNG; without it the global RNG is used as torch layers do by default."""
        config = self.unet_config(learn_sigma)
        if seed is None:
            return UNet(config)
        # torch layers draw a default init from the global RNG before reset_parameters
        # overwrites it; fork_rng restores that state so a seeded build leaves the caller's RNG
        # stream alone.
        with torch.random.fork_rng(devices=[]):
            return UNet(config, torch.Generator().manual_seed(seed))


# UNetConfig fields a named configuration may override (the shape comes from the data).
OVERRIDABLE = frozenset(UNetConfig.__dataclass_fields__) - {
    "image_size",
    "in_channels",
    "out_channels",
}


def build_unet(
    name: str,
    *,
    image_size: int,
    in_channels: int = 3,
    learn_sigma: bool = False,
    seed: int | None = None,
    **overrides,
) -> UNet:
    """`ModelConfig(name, image_size, in_channels, overrides).build(learn_sigma, seed)`."""
    return ModelConfig(name, image_size, in_channels, overrides).build(learn_sigma, seed)
