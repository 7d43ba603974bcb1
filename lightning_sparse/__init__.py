"""lightning-sparse."""
