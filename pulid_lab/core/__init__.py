"""The PuLID core: ID encoder, ID attention processors and capture hooks, losses and the total objective, the
Lightning branch and samplers, image helpers. It imports nothing else of pulid_lab, so the mini world and the real
tier (SDXL) run the same method code."""
