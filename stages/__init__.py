"""aipipe stages: one module per stage (its decision only), pure decisions, providers, pricing."""
