"""Model builders and encoder adapters: features of in-memory and saved models."""
