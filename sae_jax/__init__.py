"""sae_jax: TopK sparse autoencoders in JAX/Flax. Never imports torch (TPU pods have none)."""
