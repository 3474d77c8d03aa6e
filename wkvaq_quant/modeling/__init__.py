"""Attach a QuantPlan to a Hugging Face decoder: `handle = attach(model, plan)`; `handle.remove()`."""

from wkvaq_quant.modeling.attach import AttachHandle, attach, decoder_linears, find_attention_modules
from wkvaq_quant.modeling.attention import EAGER, SDPA, register_attention_functions

__all__ = ["EAGER", "SDPA", "AttachHandle", "attach", "decoder_linears", "find_attention_modules",
           "register_attention_functions"]
