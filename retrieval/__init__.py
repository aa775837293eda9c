"""retrieval: train a Siamese tower, index its embeddings with Faiss, query and evaluate."""

__version__ = "0.1.0"
