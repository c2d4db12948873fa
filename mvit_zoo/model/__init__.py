"""The MViT architecture (`mvit`) and its registered variants and pretrained tags (`registry`)."""
# NOTE: timm first: importing it registers the models (mvit_zoo._registration imports .registry, and so .mvit),
# which must not happen halfway through importing .mvit, whose own `import timm` would set it off otherwise
import timm  # noqa: F401
