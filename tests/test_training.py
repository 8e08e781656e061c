"""The tutorial CNN and the Flower-free training loops."""

from __future__ import annotations

import torch
from support.datasets import small_synthetic

from fedcifar_app import training
from fedcifar_app.data import normalize
from fedcifar_app.model import Net, new_model
from fedcifar_app.seeds import derive_seed

CPU = torch.device("cpu")


def test_model_maps_cifar_batches_to_ten_logits():
    model = Net()
    assert model(torch.zeros(4, 3, 32, 32)).shape == (4, 10)
    assert sum(p.numel() for p in model.parameters()) == 62006  # the blitz CNN, unchanged


def test_new_model_depends_on_seed_only_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = new_model(1), new_model(1), new_model(2)
    assert torch.rand(1) == expected_next
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_normalize_matches_tutorial_transform():
    images = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    expected = (images.float() / 255 - 0.5) / 0.5
    assert torch.allclose(normalize(images), expected, atol=1e-6)


def test_training_lowers_loss_and_is_repeatable_for_a_seed():
    data = small_synthetic(400)
    before = training.evaluate(new_model(0), data, CPU)
    runs = []
    for _ in range(2):
        model = new_model(0)
        loss = training.train(model, data, epochs=2, batch_size=32, learning_rate=0.003, device=CPU, seed=5)
        runs.append((loss, training.get_weights(model)))
    after = training.evaluate(model, data, CPU)
    assert after.loss < before.loss and after.accuracy > before.accuracy
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_evaluate_counts_examples_and_accuracy_in_range():
    result = training.evaluate(new_model(0), small_synthetic(123), CPU)
    assert result.num_examples == 123 and 0.0 <= result.accuracy <= 1.0 and result.loss > 0


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(42, "train", 3, "partition 1/10") == derive_seed(42, "train", 3, "partition 1/10")
    assert derive_seed(42, "train", 3, "partition 1/10") != derive_seed(42, "train", 4, "partition 1/10")
    assert derive_seed(42, "train", 3) == 4227469195932316468  # a digest, not Python's salted hash
