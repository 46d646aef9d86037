"""Tests; `helpers` holds what several of them build the same way."""
