"""Low-rank factorization: SVD and activation-aware SVD."""
