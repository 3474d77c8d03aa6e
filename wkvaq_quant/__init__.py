"""wkvaq: mixed-precision, mixed-format fake quantization of Llama and Mistral models."""

__version__ = "0.2.0"
