"""Datasets: synthetic tasks made on the fly, and loaders for a user's own files."""
