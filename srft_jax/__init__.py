"""srft-jax: Supervised Reinforcement Fine-Tuning (SRFT, arXiv 2506.19767) in JAX/Flax NNX."""

__version__ = "0.1.0"
