"""PyTorch + numpy side of interpretation: the torch SAE of an export, visual prompts, explainer
clients and batch explanation jobs (`python -m interpret.explain`), and the static feature dashboard
(`python -m interpret.dashboard`).

Modules: sae (SAE: TopK or JumpReLU), topacts (TOPACTS reader, latent selection), sources (image
table -> images), visual (masks, heatmaps, grids), prompts (template, answer parsing), explainers
(OpenAI-compatible and transformers clients), jobs (concurrency, retries, cache, resume), site
(HTML).
"""
