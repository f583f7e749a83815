"""Training recipes: each module holds a `RECIPE` dict and runs with `python -m recipes.NAME`.

A recipe lists only what differs from the defaults of `keras_minsnr.run_config.RunConfig`
(the Min-SNR paper's settings). Every value can be overridden: `--set key=value`.
Installed, this folder is the package `keras_minsnr.recipes` (setup.cfg maps it), so
recipes import each other relatively.
"""
