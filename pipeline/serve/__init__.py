"""``aipipe serve``: the OpenAI-compatible HTTP endpoint. Imports the client and below (DESIGN A1)."""
