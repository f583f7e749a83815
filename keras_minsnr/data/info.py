"""`DatasetInfo`: what a pipeline knows about the data it yields."""

import dataclasses
from typing import Optional
from typing import Tuple


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Metadata returned next to every `tf.data.Dataset` built by `keras_minsnr.data`.

    Args:
        name: where the data came from ("digits", a TFDS name, a folder path, a cache dir).
        image_shape: `(H, W, C)` of one element of `batch["images"]` (latent shape for a
            latent cache).
        num_classes: number of classes when batches carry `"labels"`, else `None`.
        class_names: class names in label order, or `None`.
        size: number of examples in one epoch (after skipping unreadable files), or
            `None` when unknown.
        num_skipped: corrupt or unreadable files that were skipped.
        has_text: whether batches carry `"text"` (`tf.string`, shape `(B,)`).
        latent_scale: the scale of the VAE's latent convention (latent caches only).
        latent_shift: the shift of the VAE's latent convention (latent caches only).
        vae: the name of the VAE that encoded a latent cache (see
            `keras_minsnr.backbones.autoencoders`), or `None`.
        context_shape: `(L, D)` of cached text embeddings in `batch["context"]`, or `None`.
        null_context_file: `.npy` file with the empty caption's embedding `(L, D)`, the
            null condition of a text-conditional model (latent caches with text only).

    Example:
        >>> ds, info = keras_minsnr.data.make_dataset("digits", batch_size=32)
        >>> info.image_shape, info.num_classes
        ((8, 8, 1), 10)
    """

    name: str
    image_shape: Tuple[int, int, int]
    num_classes: Optional[int] = None
    class_names: Optional[Tuple[str, ...]] = None
    size: Optional[int] = None
    num_skipped: int = 0
    has_text: bool = False
    latent_scale: Optional[float] = None
    context_shape: Optional[Tuple[int, int]] = None
    null_context_file: Optional[str] = None
    latent_shift: Optional[float] = None
    vae: Optional[str] = None
