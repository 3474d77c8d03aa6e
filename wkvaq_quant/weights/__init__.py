"""Weight quantization algorithms and the block-by-block runner they share."""
