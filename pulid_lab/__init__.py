"""pulid_lab: a workbench that teaches and ablates PuLID (Guo et al., NeurIPS 2024) in a synthetic world."""
__version__ = "0.1.0"
