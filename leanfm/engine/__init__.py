"""Running models: sampling parameters, plain generation, chat (the paged engine comes later)."""
