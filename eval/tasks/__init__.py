"""The hallucination benchmarks run on a (steered) LLaVA: POPE, CHAIR and HallusionBench, each with its
official scoring rules."""
