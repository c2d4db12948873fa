"""The MViT architecture (`mvit`) and its registered variants and pretrained tags (`registry`)."""
