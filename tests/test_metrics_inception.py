"""The FID Inception network (random weights: the real file is not on this machine), image
preprocessing and the cached reference statistics."""

import math

import numpy as np
import pytest
import torch

from ddpm.metrics import (
    FID_WEIGHTS_FILENAME,
    FID_WEIGHTS_URL,
    FeatureStats,
    FIDInceptionV3,
    SmallClassifier,
    accumulate_features,
    inception_metrics,
    prepare_images,
    reference_stats,
    resolve_fid_weights,
    save_classifier,
)


def he_init_(module: torch.nn.Module, seed: int) -> None:
    """Seeded He-normal conv/linear weights, so activations keep their scale through ~100 layers
    (PyTorch's default init shrinks them towards zero, which would make comparisons vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2 / fan_in))


@pytest.fixture(scope="module")
def inception():
    net = FIDInceptionV3()
    he_init_(net, seed=0)
    return net


def test_maps_rgb_and_grayscale_images_to_pool3_and_logits(inception):
    gen = torch.Generator().manual_seed(1)
    rgb = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    gray = torch.rand(2, 1, 28, 28, generator=gen) * 2 - 1
    with torch.no_grad():
        features, logits = inception.features_and_logits(rgb)
        gray_features, _ = inception.features_and_logits(gray)
        gray_as_rgb, _ = inception.features_and_logits(gray.expand(-1, 3, -1, -1))
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    # IS logits leave out the fc bias, as the original Inception Score code does.
    torch.testing.assert_close(logits, features @ inception.net.fc.weight.T)
    assert gray_features.shape == (2, 2048)
    assert torch.isfinite(features).all() and torch.isfinite(logits).all()
    assert (features >= 0).all()  # pool3 averages ReLU outputs
    assert not torch.allclose(features[0], features[1])  # different images, different features
    torch.testing.assert_close(gray_features, gray_as_rgb)  # grayscale = repeated channels
    assert inception.weights_sha256 is None
    with pytest.raises(ValueError, match="random weights"):
        _ = inception.extractor_id
    with pytest.raises(ValueError, match="random weights"):  # no FID from a random network
        inception_metrics(inception, [rgb], FeatureStats(2048))


def test_same_features_as_pytorch_fid_network(inception, monkeypatch):
    """pytorch-fid's own InceptionV3 with our (random) state dict gives the same pool3 features,
    so structure, key names and preprocessing match. Its builder would download the real
    checkpoint; we hand it our state dict instead (the reference network itself is unchanged)."""
    pf_inception = pytest.importorskip("pytorch_fid.inception")
    state = inception.net.state_dict()
    monkeypatch.setattr(pf_inception, "load_state_dict_from_url", lambda *a, **k: state)
    reference = pf_inception.InceptionV3([pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    reference.eval()
    images01 = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(images01)[0].flatten(1)
        ours, _ = inception.features_and_logits(images01 * 2 - 1)
    assert expected.abs().max() > 1e-3  # the He init keeps activations alive
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_missing_weights_error_names_file_and_where_to_put_it(tmp_path, monkeypatch):
    given = tmp_path / "weights" / FID_WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError) as err:
        resolve_fid_weights(given)
    assert FID_WEIGHTS_FILENAME in str(err.value) and str(given) in str(err.value)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    default = tmp_path / "torch_home" / "hub" / "checkpoints" / FID_WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError) as err:
        FIDInceptionV3().load_weights()
    message = str(err.value)
    assert str(default) in message and FID_WEIGHTS_URL in message


def test_wrong_weights_file_is_rejected_by_hash(inception, tmp_path):
    fake = tmp_path / FID_WEIGHTS_FILENAME
    torch.save(inception.net.state_dict(), fake)
    with pytest.raises(ValueError, match="sha256"):
        FIDInceptionV3().load_weights(fake)


def test_prepare_images_layouts_and_range():
    hwc = np.zeros((2, 5, 6, 3), dtype=np.uint8)
    hwc[0, 1, 2] = [0, 255, 51]
    x = prepare_images(hwc)
    assert x.shape == (2, 3, 5, 6) and x.dtype == torch.float32
    assert x[0, :, 1, 2].tolist() == pytest.approx([-1.0, 1.0, -0.6])
    assert prepare_images(np.zeros((4, 7, 7), dtype=np.uint8)).shape == (4, 1, 7, 7)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        prepare_images(torch.full((1, 3, 4, 4), 255.0))
    with pytest.raises(ValueError, match="uint8 images must be"):
        prepare_images(np.zeros((1, 3, 8, 8), dtype=np.uint8))


def test_reference_stats_are_cached_by_dataset_and_extractor(tmp_path):
    torch.manual_seed(0)
    net = SmallClassifier(1, 10, 28, width=8, feature_dim=16)
    save_classifier(net, tmp_path / "clf.pt")
    images = np.random.default_rng(3).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    batches = [images[:25], images[25:]]

    first = reference_stats(net, batches, tmp_path / "cache", "manifest-sha-a")
    direct, _ = accumulate_features(net, [images])
    assert first.count == 40
    # Equal up to float32 conv rounding, which depends on the batch split.
    scale = np.abs(direct.cov).max()
    np.testing.assert_allclose(first.cov, direct.cov, rtol=1e-3, atol=1e-4 * scale)

    def not_consumed():
        raise AssertionError("cached statistics should not re-read the images")
        yield

    again = reference_stats(net, not_consumed(), tmp_path / "cache", "manifest-sha-a")
    np.testing.assert_array_equal(again.cov, first.cov)
    other = reference_stats(net, [images[:10]], tmp_path / "cache", "manifest-sha-b")
    assert other.count == 10
    save_classifier(net, tmp_path / "clf2.pt", metadata={"note": "new id"})  # new checkpoint id
    assert reference_stats(net, [images[:5]], tmp_path / "cache", "manifest-sha-a").count == 5
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3
    assert isinstance(FeatureStats.load(next((tmp_path / "cache").glob("*.npz"))), FeatureStats)
