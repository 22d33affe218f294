"""PyTorch side of the pipeline: record LLaVA residual-stream activations into activation stores.

`python -m harvest --model=... --layers=24 --images=... --out=STORE` (see harvest/flags.py);
`harvest.run.harvest(HarvestConfig(...))` does the same from Python.
"""
