"""Flower runtime tests."""
