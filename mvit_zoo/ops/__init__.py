"""Every acceleration of the model, behind one dispatch (`dispatch.select`): attention with the
decomposed relative-position bias (`attention`) and memory-saving training functions (`memory`)."""
from .dispatch import select, set_fused_attn, use_fused_attn

__all__ = ["select", "set_fused_attn", "use_fused_attn"]
