"""Wrote transformers_before_split.keras/.npz with keras_minsnr at 47351dd, when one `DiT`
class held both DiT (adaLN-Zero) and the in-context ViT (``conditioning_mode``).

The .keras file is a DiffusionModel over a tiny in-context ViT, trained two steps; the
bare backbones go to OUT.vit_table.keras (the official layout: timestep table, no final
norm) and OUT.dit.keras. The .npz holds each backbone's output on fixed inputs, as that
code computed it, and the ViT's trained weights and their EMA averages, flattened in order. Run from a checkout of 47351dd: python make_transformers_before_split.py OUT
"""
import sys

import keras
import numpy as np

import keras_minsnr as kms
from keras_minsnr.backbones.dit import DiT

out = sys.argv[1]
keras.utils.set_random_seed(0)
small = dict(image_shape=(8, 8, 1), patch_size=4, hidden_size=16, depth=1, num_heads=2,
             num_classes=3)
vit = DiT(conditioning_mode="in_context", **small)
model = kms.DiffusionModel(vit, ema_decay=0.9)
model.compile(optimizer=keras.optimizers.Adam(1e-3))
rng = np.random.default_rng(0)
images = rng.uniform(-1, 1, (8, 8, 8, 1)).astype("float32")
model.fit((images, np.arange(8) % 3), batch_size=4, epochs=1, verbose=0)
model.save(out + ".keras")
table = DiT(conditioning_mode="in_context", timestep_embedding="table",
            timestep_table_size=50, final_norm=False, **small)
table.save(out + ".vit_table.keras")
dit = DiT(conditioning_mode="adaln_zero", **small)
for layer in (dit.blocks[0].modulation, dit.final_layer.modulation, dit.final_layer.linear):
    layer.kernel.assign(rng.normal(0, 0.1, layer.kernel.shape))  # not the zero start
dit.save(out + ".dit.keras")
inputs = {"x": rng.normal(size=(2, 8, 8, 1)).astype("float32"),
          "t": np.array([3, 41], "int32"), "y": np.array([0, 3], "int32")}
np.savez(out + ".npz", x=inputs["x"], t=inputs["t"], y=inputs["y"],
         vit=np.asarray(vit(inputs)), vit_table=np.asarray(table(inputs)),
         dit=np.asarray(dit(inputs)),
         ema=np.concatenate([np.ravel(model.ema.average_of(w)) for w in vit.trainable_weights]),
         weights=np.concatenate([np.ravel(w) for w in vit.trainable_weights]))
