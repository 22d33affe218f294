"""Training: the members of a run, their setup, and the loop (sae_jax.train runs them)."""
