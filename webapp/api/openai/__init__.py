"""An OpenAI-compatible subset of the API at /v1/ (files and fine-tuning jobs), for the official SDKs."""
