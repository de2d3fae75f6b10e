import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict

from lightly_msn.eval.knn import (
    InnerProductSearch,
    KNNClassifier,
    _ties_by_row,
    normalized_numpy,
)


def _clustered_features(
    num: int, num_classes: int = 6, dim: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator)
    labels = torch.randint(0, num_classes, (num,), generator=generator)
    features = centres[labels] + 1.5 * torch.randn(num, dim, generator=generator)
    return features, labels


def _brute_force_scores(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """Class vote weights by a plain double loop over queries and neighbours."""
    similarities = (
        F.normalize(queries, dim=1).double() @ F.normalize(bank, dim=1).T.double()
    )
    scores = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    for row in range(len(queries)):
        order = sorted(range(len(bank)), key=lambda j: -similarities[row, j].item())
        for j in order[:k]:
            scores[row, bank_labels[j]] += torch.exp(similarities[row, j] / temperature)
    return scores


def test_predictions_equal_brute_force_reference_for_every_k() -> None:
    bank, bank_labels = _clustered_features(300)
    queries, _ = _clustered_features(40, seed=1)
    classifier = KNNClassifier(ks=(1, 7, 50), temperature=0.07).fit(bank, bank_labels)
    predictions = classifier.predict(queries)
    for k in (1, 7, 50):
        scores = _brute_force_scores(queries, bank, bank_labels, k, 0.07, 6)
        expected_top1 = scores.argmax(dim=1)
        assert torch.equal(predictions[k][:, 0], expected_top1), k
        # the full ranking over the classes that received votes
        for row in range(len(queries)):
            voted = int((scores[row] > 0).sum())
            expected = torch.argsort(scores[row], descending=True)[: min(voted, 5)]
            assert torch.equal(predictions[k][row, : len(expected)], expected)
        assert predictions[k].shape == (40, 5)


def test_exactly_tied_neighbours_are_taken_in_training_row_order() -> None:
    # four identical training rows with different labels; the query points at
    # them, so they tie for the first place and k=1 must take the first row
    bank, bank_labels = _clustered_features(40, num_classes=4, dim=8)
    bank[10:14] = bank[5] * 2.0  # same direction, so exactly the same cosine
    bank[5] = -bank[5]
    bank_labels[10:14] = torch.tensor([3, 0, 1, 2])
    queries = bank[10:11].clone()
    classifier = KNNClassifier(ks=(1, 2, 6), temperature=0.1).fit(bank, bank_labels)
    predictions = classifier.predict(queries)
    assert predictions[1][0, 0] == 3
    assert set(predictions[2][0, :2].tolist()) == {3, 0}
    for k in (1, 2, 6):
        scores = _brute_force_scores(queries, bank, bank_labels, k, 0.1, 4)
        assert predictions[k][0, 0] == scores.argmax(dim=1)[0], k


def test_only_queries_with_ties_are_reordered_by_training_row() -> None:
    similarities = np.array(
        [[0.9, 0.9, 0.5], [0.8, 0.7, 0.6], [0.5, 0.4, 0.4]], dtype=np.float32
    )
    indices = np.array([[7, 2, 1], [3, 4, 5], [9, 8, 6]], dtype=np.int64)
    scores, rows = _ties_by_row(similarities.copy(), indices.copy())
    assert rows.tolist() == [[2, 7, 1], [3, 4, 5], [9, 6, 8]]
    torch.testing.assert_close(scores, torch.from_numpy(similarities))


def test_search_split_over_threads_equals_brute_force_and_keeps_omp_threads() -> None:
    bank, _ = _clustered_features(1000, dim=16)
    queries, _ = _clustered_features(600, dim=16, seed=1)  # 2+ chunks of >= 256
    threads_before = faiss.omp_get_max_threads()
    search = InnerProductSearch(bank)
    similarities, indices = search.search(normalized_numpy(queries), 10)
    assert faiss.omp_get_max_threads() == threads_before
    reference = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    expected_similarities, expected_indices = reference.topk(10, dim=1)
    assert indices.shape == (600, 10)
    assert torch.equal(torch.from_numpy(indices), expected_indices)
    torch.testing.assert_close(torch.from_numpy(similarities), expected_similarities)


def test_predictions_equal_lightly_knn_predict() -> None:
    bank, bank_labels = _clustered_features(500, num_classes=10, dim=32)
    queries, _ = _clustered_features(64, num_classes=10, dim=32, seed=2)
    classifier = KNNClassifier(ks=(20, 200), temperature=0.1).fit(bank, bank_labels)
    ours = classifier.predict(queries)
    bank_t = F.normalize(bank, dim=1).T.contiguous()
    normalized_queries = F.normalize(queries, dim=1)
    for k in (20, 200):
        lightly_ranked = knn_predict(
            normalized_queries, bank_t, bank_labels, 10, knn_k=k, knn_t=0.1
        )
        assert torch.equal(ours[k][:, 0], lightly_ranked[:, 0])
        # beyond top-1 lightly's argsort orders classes without votes arbitrarily:
        # compare the classes that received votes
        votes = _brute_force_scores(queries, bank, bank_labels, k, 0.1, 10) > 0
        for row in range(len(queries)):
            voted = min(int(votes[row].sum()), 5)
            assert torch.equal(ours[k][row, :voted], lightly_ranked[row, :voted])


def test_score_reports_top1_top5_per_k_and_ties_go_to_smaller_class() -> None:
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    bank_labels = torch.tensor([2, 1, 0])
    classifier = KNNClassifier(ks=(2, 3)).fit(bank, bank_labels)
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ranked = classifier.predict(queries)
    # query 0: two equal-weight votes for classes 2 and 1 -> tie -> class 1 first
    assert ranked[2][0, :2].tolist() == [1, 2]
    assert ranked[2].shape == (2, 3)  # only three classes exist
    scores = classifier.score(queries, torch.tensor([2, 0]))
    assert scores["knn_top1@2"] == pytest.approx(50.0)
    assert scores["knn_top5@2"] == pytest.approx(100.0)
    assert set(scores) == {"knn_top1@2", "knn_top5@2", "knn_top1@3", "knn_top5@3"}


def test_bad_inputs_raise_clear_errors() -> None:
    bank, labels = _clustered_features(20)
    with pytest.raises(ValueError, match="same length"):
        KNNClassifier(ks=(5,)).fit(bank, labels[:-1])
    with pytest.raises(ValueError, match="larger than the 20 train features"):
        KNNClassifier(ks=(21,)).fit(bank, labels)
    nan_bank = bank.clone()
    nan_bank[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf values .* in 1 of 20 rows"):
        KNNClassifier(ks=(5,)).fit(nan_bank, labels)
    classifier = KNNClassifier(ks=(5,)).fit(bank, labels)
    with pytest.raises(ValueError, match="empty"):
        classifier.score(torch.empty(0, 16), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="dimension 8"):
        classifier.predict(torch.randn(3, 8))
    with pytest.raises(ValueError, match="ks must be"):
        KNNClassifier(ks=())
    with pytest.raises(RuntimeError, match="call fit"):
        KNNClassifier().predict(bank)


def test_rows_whose_norm_overflows_are_rejected_like_nan_rows() -> None:
    # normalising such a row would silently give zeros
    bank, labels = _clustered_features(20)
    bank[11, 0] = 1e25
    with pytest.raises(
        ValueError, match=r"too large .* in 1 of 20 rows \(first: row 11\)"
    ):
        KNNClassifier(ks=(5,)).fit(bank, labels)
