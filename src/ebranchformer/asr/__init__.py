"""Speech recognition around the encoder: features, tokenizers, data, the CTC model, decoding and training."""
