"""Command-line tools: `cli` (the one `mvit-zoo` front), `finetune`, `predict`."""
