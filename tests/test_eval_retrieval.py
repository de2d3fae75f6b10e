import pytest
import torch

from lightly_msn.eval.retrieval import retrieval_metrics


def test_perfectly_clustered_embeddings_score_100() -> None:
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    result = retrieval_metrics(features, labels)  # same set, self-matches excluded
    assert result == pytest.approx(
        {
            "precision_at_1": 100.0,
            "r_precision": 100.0,
            "mean_average_precision_at_r": 100.0,
        }
    )


def test_hand_computed_values_with_separate_reference_set() -> None:
    # Every class has R = 2 references. Worked out by hand:
    #   query 0 (class 0): ranked refs r0 (hit), r1 (miss)  -> P@1 1, RP 1/2, AP@R 1/2
    #   query 1 (class 0): ranked refs r1 (miss), r0 (hit)  -> P@1 0, RP 1/2, AP@R 1/4
    #   query 2 (class 1): ranked refs r2 (hit), r3 (miss)  -> P@1 1, RP 1/2, AP@R 1/2
    #   query 3 (class 1): ranked refs r3 (miss), r2 (hit)  -> P@1 0, RP 1/2, AP@R 1/4
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    query_labels = torch.tensor([0, 0, 1, 1])
    references = queries.clone()
    reference_labels = torch.tensor([0, 1, 1, 0])
    result = retrieval_metrics(queries, query_labels, references, reference_labels)
    assert result["precision_at_1"] == pytest.approx(50.0)
    assert result["r_precision"] == pytest.approx(50.0)
    assert result["mean_average_precision_at_r"] == pytest.approx(37.5)


def test_self_match_is_excluded_in_same_set_mode() -> None:
    # Each point's nearest other point has the other label: without excluding the
    # query itself, precision@1 would be 100.
    features = torch.tensor([[1.0, 0.0], [0.98, 0.2], [0.0, 1.0], [0.2, 0.98]])
    labels = torch.tensor([0, 1, 1, 0])
    result = retrieval_metrics(features, labels, metrics=["precision_at_1"])
    assert result == {"precision_at_1": pytest.approx(0.0)}


def test_bad_inputs_raise() -> None:
    features = torch.randn(4, 3)
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="non-empty subset"):
        retrieval_metrics(features, labels, metrics=["recall_at_5"])
    with pytest.raises(ValueError, match="same length"):
        retrieval_metrics(features, labels[:3])
    with pytest.raises(ValueError, match="give both"):
        retrieval_metrics(features, labels, reference_features=features)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((4, 3), float("nan")), labels)
