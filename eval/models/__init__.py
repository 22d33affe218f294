"""The models evaluation uses beside the SAE's subject: CLIP (open_clip), the grounding models
(GroundingDINO + SAM), the label refiner, and the lmms-eval model wrapper of a steered LLaVA."""
