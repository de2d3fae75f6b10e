"""Evaluation of frozen features: faiss kNN, retrieval metrics and few-shot."""
