"""Wrote ema_before_e4ee228.keras/.npz with keras_minsnr at f3afc09 (before the EMA became
its own sub-layer in e4ee228): EMA copies then were the DiffusionModel's own weights.
The .npz holds the EMA arrays, then the backbone weights, as that code saw them.
Run from a checkout of f3afc09: python make_ema_before_e4ee228.py OUT.keras
"""
import sys, numpy as np, keras
import keras_minsnr as kms
import keras_minsnr.backbones.mlp
keras.utils.set_random_seed(0)
bb = kms.backbones.mlp.MLPDenoiser(image_shape=(8, 8, 1), num_classes=10, hidden_size=8, depth=1)
m = kms.DiffusionModel(bb, ema_decay=0.9)
m.compile(optimizer=keras.optimizers.Adam(1e-3))
x = np.random.default_rng(0).uniform(-1, 1, (16, 8, 8, 1)).astype("float32")
y = np.arange(16) % 10
m.fit((x, y), batch_size=8, epochs=2, verbose=0)
m.save(sys.argv[1])
np.savez(sys.argv[1] + ".npz", *[w.numpy() if hasattr(w,'numpy') else np.asarray(w) for w in m.ema_weights], *[np.asarray(v) for v in bb.weights])
print(len(m.ema_weights), len(bb.weights))
