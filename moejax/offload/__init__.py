"""Serving MoE models whose experts do not all fit in memory: on-disk expert store, budgeted cache, runtime."""
