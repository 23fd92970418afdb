"""Signatures imgpack writes and checks, in the formats ``cosign verify --key`` reads (no network, no store)."""
