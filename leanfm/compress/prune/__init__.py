"""Pruning methods: magnitude, Wanda, SparseGPT (unstructured and N:M), ShortGPT layers, channels/heads."""
