"""Weighted k-nearest-neighbour classification of frozen features on faiss.

Each query votes with its ``k`` most cosine-similar training features, every neighbour
weighted by ``exp(similarity / temperature)``, as in InstDisc [1] and DINO [2] (the
protocol MSN [0] also reports). All ``ks`` are served by one faiss search with the
largest ``k``: the neighbours of a smaller ``k`` are a prefix of that result.

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
- [1]: Unsupervised Feature Learning via Non-Parametric Instance Discrimination,
  2018, https://arxiv.org/abs/1805.01978
- [2]: Emerging Properties in Self-Supervised Vision Transformers, 2021,
  https://arxiv.org/abs/2104.14294
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightly_msn.eval.checks import check_features, check_labels

TOP_N = 5  # the classifier ranks the top-5 classes for top-1 / top-5 accuracy
_MIN_CHUNK_ROWS = 256  # fewer queries per thread are not worth a thread


class InnerProductSearch:
    """Exact maximum inner-product search over the L2-normalised rows of a bank.

    On CPU the normalised bank is searched in place with ``faiss.knn`` (blocked
    BLAS products with the top-k selection fused in), so the bank's one float32
    copy is the only full-size one. With faiss-gpu and a visible GPU the rows go
    to a GPU ``IndexFlatIP`` instead.

    Attributes:
        dim:
            Feature dimension of the bank.
    """

    def __init__(self, features: Tensor) -> None:
        bank = normalized_numpy(features)
        self.dim = bank.shape[1]
        self._bank: np.ndarray | None = bank
        self._gpu_index: faiss.Index | None = None
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self._gpu_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(self.dim))
            self._gpu_index.add(bank)
            self._bank = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities, indices)``, each (N, k), most similar first.

        On CPU the queries are split into one chunk per OpenMP thread, and each
        chunk is searched by its own Python thread with a single-threaded faiss
        (faiss releases the GIL), which was faster than one search whose BLAS
        products and top-k selection are each split over the threads, which
        synchronise after every block.
        """
        if self._gpu_index is not None:
            return self._gpu_index.search(queries, k)
        workers = min(faiss.omp_get_max_threads(), len(queries) // _MIN_CHUNK_ROWS)
        if workers <= 1:
            return self._search_chunk(queries, k)
        chunks = np.array_split(queries, workers)
        with ThreadPoolExecutor(workers) as pool:
            results = list(
                pool.map(self._search_single_threaded, chunks, [k] * workers)
            )
        return (
            np.concatenate([similarities for similarities, _ in results]),
            np.concatenate([indices for _, indices in results]),
        )

    def _search_chunk(
        self, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self._bank is not None
        similarities, indices = faiss.knn(
            queries, self._bank, k, metric=faiss.METRIC_INNER_PRODUCT
        )
        return similarities, indices

    def _search_single_threaded(
        self, queries: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss.omp_set_num_threads(1)  # OpenMP settings are per thread: this worker's
        return self._search_chunk(queries, k)


def normalized_numpy(features: Tensor) -> np.ndarray:
    """L2-normalised float32 C-contiguous numpy copy, as faiss wants it."""
    normalized = F.normalize(features.detach().float().cpu(), dim=1)
    return np.ascontiguousarray(normalized.numpy())


class KNNClassifier:
    """Weighted kNN classifier with several ``k`` served by one exact faiss search.

    Attributes:
        ks:
            Numbers of neighbours to evaluate, e.g. ``(10, 20, 100, 200)``.
        temperature:
            Neighbour weights are ``exp(cosine_similarity / temperature)``; 0.07 as
            DINO, lightly's ``knn_predict`` defaults to 0.1.
        query_batch_size:
            Queries per faiss search, bounds the memory of the neighbour lists.

    Examples:
        >>> classifier = KNNClassifier(ks=(10, 20)).fit(train_features, train_labels)
        >>> classifier.score(test_features, test_labels)
        {'knn_top1@10': 91.2, 'knn_top5@10': 99.1, 'knn_top1@20': ...}
    """

    def __init__(
        self,
        ks: Sequence[int] = (20,),
        temperature: float = 0.07,
        query_batch_size: int = 4096,
    ) -> None:
        ks = tuple(int(k) for k in ks)
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be a non-empty list of positive ints, got {ks}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if query_batch_size < 1:
            raise ValueError(
                f"query_batch_size must be positive, got {query_batch_size}"
            )
        self.ks = ks
        self.temperature = temperature
        self.query_batch_size = query_batch_size
        self.index: InnerProductSearch | None = None
        self.labels = torch.empty(0, dtype=torch.long)
        self.num_classes = 0

    def fit(self, features: Tensor, labels: Tensor) -> KNNClassifier:
        """Stores the L2-normalised training features and their labels."""
        features = check_features(features, "train features")
        labels = check_labels(labels, len(features), "train labels")
        if max(self.ks) > len(features):
            raise ValueError(
                f"k={max(self.ks)} is larger than the {len(features)} train features"
            )
        self.index = InnerProductSearch(features)
        self.labels = labels.cpu()
        self.num_classes = int(labels.max()) + 1
        return self

    def predict(self, queries: Tensor) -> dict[int, Tensor]:
        """Ranks the classes for every query.

        Returns:
            For every ``k``, an int64 tensor (N, min(5, num_classes)) of class ids,
            best first; ties are broken towards the smaller class id.
        """
        ranked: dict[int, list[Tensor]] = {k: [] for k in self.ks}
        for scores in self._class_scores(queries):
            for k, score in scores.items():
                ranked[k].append(_rank_classes(score))
        return {k: torch.cat(parts) for k, parts in ranked.items()}

    def score(self, queries: Tensor, labels: Tensor) -> dict[str, float]:
        """Top-1 and top-5 accuracy in percent for every ``k``.

        Returns:
            ``{"knn_top1@<k>": ..., "knn_top5@<k>": ...}``.
        """
        queries = check_features(queries, "query features")
        labels = check_labels(labels, len(queries), "query labels")
        result: dict[str, float] = {}
        for k, ranked in self.predict(queries).items():
            hits = ranked == labels.unsqueeze(1)
            result[f"knn_top1@{k}"] = 100.0 * hits[:, 0].float().mean().item()
            result[f"knn_top5@{k}"] = 100.0 * hits.any(dim=1).float().mean().item()
        return result

    def _class_scores(self, queries: Tensor) -> Iterator[dict[int, Tensor]]:
        """Yields, per query batch, ``{k: (B, num_classes) summed vote weights}``."""
        if self.index is None:
            raise RuntimeError("call fit() before predict() or score()")
        queries = check_features(queries, "query features")
        if queries.shape[1] != self.index.dim:
            raise ValueError(
                f"query features have dimension {queries.shape[1]} but the train "
                f"features have {self.index.dim}"
            )
        max_k = max(self.ks)
        for start in range(0, len(queries), self.query_batch_size):
            batch = normalized_numpy(queries[start : start + self.query_batch_size])
            similarities, indices = _ties_by_row(*self.index.search(batch, max_k))
            weights = similarities.div_(self.temperature).exp_()
            neighbour_labels = self.labels[indices]
            yield {
                k: torch.zeros(len(batch), self.num_classes).scatter_add_(
                    1, neighbour_labels[:, :k], weights[:, :k]
                )
                for k in self.ks
            }


def _ties_by_row(
    similarities: np.ndarray, indices: np.ndarray
) -> tuple[Tensor, Tensor]:
    """Orders exactly tied neighbours by training row, as a stable brute-force sort.

    faiss returns ties in an unspecified order (the flat search: last row first), so
    without this the neighbours of a smaller ``k`` would depend on it. Only the
    queries with a tie are re-sorted. Ties that straddle the largest ``k`` stay
    faiss's choice.
    """
    scores, rows = torch.from_numpy(similarities), torch.from_numpy(indices)
    tied = (scores[:, 1:] == scores[:, :-1]).any(dim=1).nonzero().squeeze(1)
    if len(tied) == 0:
        return scores, rows
    tied_rows, by_row = torch.sort(rows[tied], dim=1, stable=True)
    tied_scores, by_score = torch.sort(
        scores[tied].gather(1, by_row), dim=1, descending=True, stable=True
    )
    scores[tied], rows[tied] = tied_scores, tied_rows.gather(1, by_score)
    return scores, rows


def _rank_classes(scores: Tensor) -> Tensor:
    """Top classes by score, ties broken towards the smaller class id."""
    top = min(TOP_N, scores.shape[1])
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top]
