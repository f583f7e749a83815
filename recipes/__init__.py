"""Training recipes: each module holds a `RECIPE` dict and runs with `python -m recipes.NAME`.

A recipe lists only what differs from `keras_minsnr.training.DEFAULTS` (the Min-SNR
paper's settings). Every value can be overridden: `--set key=value`.
"""
