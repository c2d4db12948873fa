"""Data: transforms (`transforms`), class-folder datasets and samplers (`folders`), video I/O and clip
transforms (`video`), shipped label sets and the sample image."""
