"""Data: video I/O and clip transforms (`video`), shipped label sets and the sample image."""
