"""The real tier: SDXL / SD1.5 pipelines, insightface and the official PuLID v1 encoder from local weights, and
their training — on the same core as the mini world. Tiny stand-ins of the same classes test it on a CPU."""
