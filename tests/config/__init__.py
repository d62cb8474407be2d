"""Configs and quality gates."""
