"""A zoo of models in Flax linen and NNX, each with the ZIG count derived by hand."""
