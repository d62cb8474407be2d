"""Automatic per-layer precision: the smallest checkpoint that meets a quality target, or the best
quality within a size.

``quantcli quantize MODEL --target-ppl-increase 1`` (or ``--target-kl``, ``--target-size``,
``--target-bpw``) gives every tensor a list of candidates (:mod:`.candidates`), rounds it each way
with the run's method (rtn or gptq; gptq shares one Hessian per layer across candidates), predicts
each choice's cost from a measured Fisher-weighted output error validated against measured KL
(:mod:`.sensitivity`), solves the allocation exactly (:mod:`.solver`), and verifies it on held-out
text, tightening and repeating a bounded number of times (:mod:`.search`).
"""
