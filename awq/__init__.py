"""Activation-aware weight quantization (AWQ) with INT and BitMoD weights."""
