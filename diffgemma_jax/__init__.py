"""diffgemma-jax: sparse-MoE diffusion language models in JAX/Flax NNX."""
