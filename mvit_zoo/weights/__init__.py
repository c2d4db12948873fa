"""Weights: download and cache (`hub`), upstream checkpoint layouts (`convert`), Hub-ready folders (`publish`)."""
