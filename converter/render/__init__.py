"""Renderers: each is a function of a Report alone (rich console, JSON)."""
