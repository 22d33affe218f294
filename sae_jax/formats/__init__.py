"""The files sae_jax writes for the torch side to read (numpy and safetensors only, no jax): the
exported dictionary layouts, the model card, and the top-activations folder of a scan."""
