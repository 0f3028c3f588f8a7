"""Masked-diffusion language models and their serving (dLLM-Serve).

A diffusion LM is the library's :class:`~moejax.models.transformer.Transformer` with bidirectional attention
(``ModelConfig.causal=False``), trained with the ``mdm`` objective (:mod:`moejax.train.objectives`). This package
holds what generates with it: :mod:`moejax.diffusion.sampler` (LLaDA's low-confidence remasking over
semi-autoregressive blocks, Fast-dLLM's prefix and dual KV caches, logit budgeting) and the evaluation helpers
(:mod:`moejax.diffusion.evaluate`: infill accuracy).
"""
