"""Datasets: a generated controlled-bias face set in CelebA's format, and real CelebA / LFW loaders."""
