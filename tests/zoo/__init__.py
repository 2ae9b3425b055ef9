"""The model zoo (one spec per model, built in Flax linen and NNX) and its shared checks."""
