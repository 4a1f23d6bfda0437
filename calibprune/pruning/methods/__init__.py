"""The pruning methods, sparsity profiles and mask refiners: one file each, holding its config and its math.

Each is registered by one line in :mod:`calibprune.pruning.registry`; the layer loop, the statistics' lifecycle, the
distributed reduction and the report come from the base classes (:mod:`calibprune.pruning.method`).
"""
