import pytest
import torch

from lightly_msn.eval.fewshot import (
    few_shot_eval,
    fit_logistic_regression,
    parse_shots,
    preprocess_features,
    sample_few_shot,
)


def _clusters(
    per_class: int,
    num_classes: int = 4,
    dim: int = 16,
    spread: float = 0.1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.eye(num_classes, dim)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + spread * torch.randn(
        len(labels), dim, generator=generator
    )
    return features, labels


def test_sampling_is_balanced_deterministic_and_differs_across_seeds() -> None:
    labels = torch.arange(5).repeat_interleave(40)[torch.randperm(200)]
    first = sample_few_shot(labels, 3, seed=0)
    assert torch.bincount(labels[first], minlength=5).tolist() == [3] * 5
    assert len(set(first.tolist())) == 15
    assert torch.equal(first, sample_few_shot(labels, 3, seed=0))
    assert not torch.equal(first, sample_few_shot(labels, 3, seed=1))
    fraction = sample_few_shot(labels, 0.1, seed=0)
    assert torch.bincount(labels[fraction], minlength=5).tolist() == [4] * 5


def test_class_with_too_few_images_raises() -> None:
    labels = torch.tensor([0, 0, 0, 1])
    with pytest.raises(ValueError, match="class 1 has 1 labelled images, fewer than"):
        sample_few_shot(labels, 2, seed=0)


def test_preprocessing_centres_each_row_and_normalises() -> None:
    features = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 8.0]])
    processed = preprocess_features(features)
    expected = torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 2.0]])
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(processed, expected)


def test_logistic_regression_matches_scikit_learn_optimum() -> None:
    from sklearn.linear_model import LogisticRegression

    features, labels = _clusters(10, spread=2.0)
    features = preprocess_features(features)
    weights = fit_logistic_regression(features, labels, 4, regularization=1.0)
    reference = LogisticRegression(C=1.0, fit_intercept=False, tol=1e-10, max_iter=5000)
    reference.fit(features.double().numpy(), labels.numpy())
    # the multinomial optimum is unique up to a shift shared by all classes, which
    # the L2 penalty fixes to zero; so the weights themselves must agree
    torch.testing.assert_close(
        weights, torch.from_numpy(reference.coef_).float(), atol=2e-3, rtol=1e-3
    )


def test_near_perfect_on_separable_clusters_and_chance_on_shuffled_labels() -> None:
    train_x, train_y = _clusters(30)
    test_x, test_y = _clusters(50, seed=1)
    results = few_shot_eval(
        train_x, train_y, test_x, test_y, shots=[1, 0.1], seeds=3, progress=False
    )
    assert [result.name for result in results] == ["1", "10%"]
    for result in results:
        assert result.mean > 99.0
        assert len(result.accuracies) == 3
    assert results[0].num_labelled == [4, 4, 4]
    assert results[0].labels_per_class == 1.0

    shuffled_y = train_y[
        torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))
    ]
    noise_x = torch.randn(len(train_y), 16, generator=torch.Generator().manual_seed(3))
    # noise features fit to random labels; a strong penalty keeps L-BFGS short
    (chance,) = few_shot_eval(
        noise_x,
        shuffled_y,
        test_x,
        test_y,
        shots=[10],
        seeds=5,
        regularization=10.0,
        progress=False,
    )
    assert 10.0 < chance.mean < 40.0  # 4 classes: chance is 25 %


def test_regularization_grid_is_chosen_on_held_out_images() -> None:
    train_x, train_y = _clusters(30)
    test_x, test_y = _clusters(20, seed=1)
    (result,) = few_shot_eval(
        train_x,
        train_y,
        test_x,
        test_y,
        shots=[5],
        seeds=2,
        regularization=[1e3, 1e-3],
        progress=False,
    )
    assert set(result.regularizations) <= {1e3, 1e-3}
    with pytest.raises(ValueError, match=">= 2 labelled images per class"):
        few_shot_eval(
            train_x,
            train_y,
            test_x,
            test_y,
            shots=[1],
            seeds=1,
            regularization=[1.0, 0.1],
            progress=False,
        )


def test_parse_shots_and_input_errors() -> None:
    assert parse_shots("1, 2,5,1%") == [1, 2, 5, 0.01]
    with pytest.raises(ValueError, match="bad few-shot setting '0'"):
        parse_shots("0,1")
    with pytest.raises(ValueError, match="bad few-shot setting '150%'"):
        parse_shots("150%")
    train_x, train_y = _clusters(5)
    with pytest.raises(ValueError, match="same length"):
        few_shot_eval(train_x, train_y[:-1], train_x, train_y, progress=False)
    with pytest.raises(ValueError, match="test features is empty"):
        few_shot_eval(
            train_x, train_y, torch.empty(0, 16), torch.empty(0).long(), progress=False
        )
    nan_x = train_x.clone()
    nan_x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        few_shot_eval(nan_x, train_y, train_x, train_y, progress=False)
