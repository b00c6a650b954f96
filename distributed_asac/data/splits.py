"""The three splits every dataset of this package has, in the order CelebA's partition file numbers them."""

SPLITS: tuple[str, ...] = ("train", "valid", "test")
"""Split names; split ``i`` is written ``i`` in ``list_eval_partition.txt`` (0 train, 1 valid, 2 test)."""

SPLIT_FRACTIONS: tuple[float, ...] = (0.7, 0.1, 0.2)
"""The shares of the images that the generated dataset and LFW's person-disjoint split give the splits (CelebA
ships its own partition)."""
