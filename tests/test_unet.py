"""The paper's U-Net: sizes, placement of attention, timestep conditioning and input checks."""

import math

import pytest
import torch

from ddpm.nn import UNET_CONFIGS, UNet, build_unet
from ddpm.nn.layers import AttnBlock, timestep_embedding


def _meta_unet(name: str, **kwargs) -> UNet:
    # Parameters on the meta device have shapes but no storage: counting the 114M-parameter
    # CelebA-HQ net this way takes a fraction of a second.
    with torch.device("meta"):
        return build_unet(name, **kwargs)


def _perturb(model: UNet, seed: int = 0) -> UNet:
    """Give the zero-initialised layers random weights so the output depends on its inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_cifar10_counts_the_papers_35_7m_parameters():
    n = _meta_unet("cifar10", image_size=32, in_channels=3).num_parameters()
    assert abs(n - 35.7e6) / 35.7e6 < 0.01
    # The official TensorFlow model's count, which only the same layer layout reproduces exactly.
    assert n == 35_746_307


def test_celebahq256_rounds_to_the_papers_114m_parameters():
    n = _meta_unet("celebahq256", image_size=256, in_channels=3).num_parameters()
    # The paper prints "114M", three significant figures: the true count is in [113.5M, 114.5M).
    assert 113.5e6 <= n < 114.5e6


def test_learn_sigma_adds_only_the_extra_output_channels():
    base = _meta_unet("cifar10", image_size=32).num_parameters()
    learned = _meta_unet("cifar10", image_size=32, learn_sigma=True).num_parameters()
    # Only the final 3x3 conv from ch=128 channels grows, by 3 output maps (weights + biases).
    assert learned - base == 3 * (128 * 3 * 3 + 1)


@pytest.mark.parametrize(
    "name,size,channels", [("tiny", 28, 1), ("tiny", 8, 3), ("small", 28, 1), ("small", 32, 3)]
)
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shape(name, size, channels, learn_sigma):
    model = build_unet(name, image_size=size, in_channels=channels, learn_sigma=learn_sigma, seed=0)
    x = torch.randn(3, channels, size, size)
    out = model(x, torch.tensor([0, 17, 999]))
    assert out.shape == (3, channels * (2 if learn_sigma else 1), size, size)


def test_fresh_net_predicts_zero_and_resblocks_start_as_identity():
    model = build_unet("tiny", image_size=16, in_channels=3, seed=0)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x, torch.tensor([1, 500])), torch.zeros_like(x))
    res = model.down[0].res  # 16 -> 16 channels: identity skip, zero-initialised last conv
    h = torch.randn(2, 16, 16, 16)
    assert torch.equal(res(h, torch.randn(2, 64)), h)


def _attention_resolutions(model: UNet) -> tuple[list[int], list[int]]:
    level = [m.resolution for m in (model.down + model.up).modules() if isinstance(m, AttnBlock)]
    mid = [m.resolution for m in model.mid.modules() if isinstance(m, AttnBlock)]
    return level, mid


def test_cifar10_attention_sits_only_at_16x16_plus_the_middle_block():
    level, mid = _attention_resolutions(_meta_unet("cifar10", image_size=32))
    # Down path: 2 blocks at the 16 px level; up path: 3 blocks there (num_res_blocks + 1).
    assert level == [16] * 5
    # The official net also attends in the middle block, at the lowest resolution 32 / 2**3.
    assert mid == [4]


@pytest.mark.parametrize("size,expected", [(28, 14), (32, 16)])
def test_small_attention_runs_at_the_recorded_resolution(size, expected):
    model = build_unet("small", image_size=size, in_channels=1, seed=0)
    level, mid = _attention_resolutions(model)
    assert level == [expected] * 5 and mid == [size // 4]
    # The recorded resolution is the size of the feature map each block really sees.
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: seen.append((mod.resolution, args[0].shape)))
        for m in model.modules()
        if isinstance(m, AttnBlock)
    ]
    model(torch.randn(2, 1, size, size), torch.tensor([3, 4]))
    for h in hooks:
        h.remove()
    assert len(seen) == 6
    assert all(shape[-2:] == (res, res) for res, shape in seen)


def test_timestep_embedding_matches_the_formula():
    t = torch.tensor([0, 1, 999])
    dim = 16
    emb = timestep_embedding(t, dim)
    half = dim // 2
    for i, ti in enumerate(t.tolist()):
        for j in range(half):
            freq = math.exp(-math.log(10000.0) * j / (half - 1))
            assert emb[i, j].item() == pytest.approx(math.sin(ti * freq), abs=1e-4)
            assert emb[i, half + j].item() == pytest.approx(math.cos(ti * freq), abs=1e-4)
    # The lowest frequency is exactly 1/10000 (the spacing divides by half - 1, not half).
    assert emb[2, half - 1].item() == pytest.approx(math.sin(999 / 10000), abs=1e-6)


def test_changing_t_changes_the_output():
    model = _perturb(build_unet("small", image_size=28, in_channels=1, seed=0)).eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_a = model(x, torch.tensor([10, 10]))
        out_b = model(x, torch.tensor([500, 500]))
        out_a_again = model(x, torch.tensor([10, 10]))
        out_float = model(x, torch.tensor([10.0, 10.0]))
    assert torch.equal(out_a, out_a_again)
    torch.testing.assert_close(out_float, out_a)
    # Relative change far above float32 round-off: t really conditions the prediction.
    assert (out_a - out_b).norm() / out_a.norm() > 1e-2


def test_one_adam_step_makes_the_output_depend_on_t():
    model = build_unet("tiny", image_size=16, in_channels=1, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 100, 500, 900])
    loss = (model(x, t) - x).square().mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        out_early = model(x[:1], torch.tensor([0]))
        out_late = model(x[:1], torch.tensor([900]))
    # The first step can move only the output conv (every gradient upstream of it was multiplied
    # by its zero weights), and every residual branch is still zero: t cannot matter yet.
    assert out_early.abs().max() > 0
    assert torch.equal(out_early, out_late)
    opt.zero_grad()
    (model(x, t) - x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        out_early = model(x[:1], torch.tensor([0]))
        out_late = model(x[:1], torch.tensor([900]))
    assert (out_early - out_late).abs().max() > 1e-6


def test_same_seed_same_network_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = build_unet("small", image_size=28, in_channels=1, seed=7)
    b = build_unet("small", image_size=28, in_channels=1, seed=7)
    c = build_unet("small", image_size=28, in_channels=1, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv_in.weight"], sc["conv_in.weight"])
    x = torch.randn(2, 1, 28, 28)
    _perturb(a), _perturb(b)
    assert torch.equal(a(x, torch.tensor([5, 6])), b(x, torch.tensor([5, 6])))


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout():
    grads = []
    for use_checkpoint in (False, True):
        model = build_unet(
            "tiny", image_size=16, in_channels=1, seed=0, dropout=0.3, use_checkpoint=use_checkpoint
        )
        _perturb(model).train()
        torch.manual_seed(123)  # same dropout masks in both runs
        x = torch.randn(2, 1, 16, 16)
        model(x, torch.tensor([1, 2])).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0])


def test_channels_last_input_gives_the_same_output():
    model = _perturb(build_unet("tiny", image_size=16, in_channels=3, seed=0)).eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 300])
    with torch.no_grad():
        ref = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="cifar10", image_size=28), "image_size=28 .* multiple of 8"),
        (dict(name="small", image_size=30), "image_size=30 .* multiple of 4"),
        (dict(name="cifar11", image_size=32), "unknown UNet config 'cifar11'.*cifar10"),
        (dict(name="cifar10", image_size=32, attn_resolutions=(12,)), "attn_resolutions \\[12\\]"),
        (dict(name="small", image_size=8), "config 'small' puts attention at \\(16, 14\\)"),
        (dict(name="cifar10", image_size=32, dropout=1.0), "dropout must be in \\[0, 1\\)"),
        (dict(name="cifar10", image_size=32, dropout=-0.1), "dropout must be in \\[0, 1\\)"),
        (dict(name="cifar10", image_size=32, ch=100), "ch=100 must be divisible by num_groups=32"),
        (dict(name="tiny", image_size=16, ch_mult=()), "ch_mult must be a non-empty"),
        (dict(name="tiny", image_size=16, num_res_blocks=0), "num_res_blocks must be a positive"),
        (dict(name="tiny", image_size=16, in_channels=0), "in_channels must be a positive"),
        (dict(name="tiny", image_size=16, width=3), "unknown UNet override\\(s\\) \\['width'\\]"),
    ],
)
def test_bad_configuration_is_a_value_error_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _meta_unet(**kwargs)


def test_bad_forward_input_is_a_value_error():
    model = build_unet("tiny", image_size=16, in_channels=1, seed=0)
    with pytest.raises(ValueError, match="input must be \\[N, 1, H, W\\]"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(2, 1, 15, 15), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="t must be a scalar or have shape \\[2\\]"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([0, 1, 2]))


def test_named_configs_are_valid_at_their_intended_sizes():
    sizes = {"cifar10": [32], "celebahq256": [256], "small": [28, 32], "tiny": [8, 28, 32]}
    assert set(sizes) == set(UNET_CONFIGS)
    for name, image_sizes in sizes.items():
        for size in image_sizes:
            model = _meta_unet(name, image_size=size)
            assert model.config.image_size == size
            assert model.config_dict()["ch_mult"] == list(UNET_CONFIGS[name]["ch_mult"])


def test_bf16_autocast_forward_and_backward():
    model = _perturb(build_unet("tiny", image_size=16, in_channels=1, seed=0)).eval()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([3, 900])
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    # bf16 keeps 8 mantissa bits (0.4% per rounding); some twenty layers deep, a few percent.
    assert (out.float() - ref).norm() / ref.norm() < 0.05
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, t).float().square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.gpu
def test_attention_matches_its_explicit_form_and_grads_keep_the_weight_layout(device):
    """The attention block (1x1 projections as dense layers on tokens, softmax attention through
    F.scaled_dot_product_attention) computes the explicit softmax(QKᵀ/√c)V with the 1x1
    convolutions it holds, to 1e-5 in fp32 (TF32 off); every gradient has its parameter's
    strides, the layout DDP's gradient buckets expect (the CPU convolution's backward broke it
    at batch 16)."""
    # This compares fp32 itself: no TF32 (cuDNN's default, and a CUDA Trainer's with tf32 on).
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    saved = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        _check_attention(device)
    finally:
        for b, value in zip(backends, saved, strict=True):
            b.fp32_precision = value


def _check_attention(device):
    torch.manual_seed(0)
    block = AttnBlock(32, 8, 7).to(device)
    with torch.no_grad():
        block.proj_out.weight.normal_(0, 0.1)
    x = torch.randn(16, 32, 7, 7, device=device, requires_grad=True)
    n, c, h, w = x.shape
    y = block.norm(x)
    q, k, v = (p(y).reshape(n, c, h * w).transpose(1, 2) for p in (block.q, block.k, block.v))
    a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1) @ v
    explicit = x + block.proj_out(a.transpose(1, 2).reshape(n, c, h, w))
    out = block(x)
    torch.testing.assert_close(out, explicit, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad.stride() == p.stride(), name
