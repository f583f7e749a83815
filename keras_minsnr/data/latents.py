"""Latent caching: encode a dataset once with a frozen VAE, train on files.

The Min-SNR paper trains ImageNet-256 models on 32x32x4 SD-VAE latents (0.18215 times the
posterior mean). Encoding every step is wasteful, so `cache_latents` runs the encoder once
over a finite dataset and writes shards of `.npy` files plus `manifest.json` to
`cache_dir`; `load_latent_cache` turns them back into a pipeline of batch dicts
`{"images": latents, "labels"?, "text"?, "context"?}`.

With an autoencoder of `keras_minsnr.backbones.autoencoders` the cache holds exactly what
its `encode_images` returns (the space the diffusion model trains in; the autoencoder
applies its scale and shift, once) and the manifest records which VAE, its scale and its
shift. A cache of an older format is refused with a line saying how to re-encode it.

Files in `cache_dir` (each written to a temporary name and renamed, the manifest last, so
a killed run never leaves a cache that looks complete)::

    manifest.json            {"format", "version", "vae", "scale", "shift", "count", ...}
    latents-00000.npy        float32 (n, h, w, c), in the diffusion model's space
    labels-00000.npy         int32 (n,)                       when the data has labels
    text-00000.json          list of n captions               when the data has text
    context-00000.npy        float32 (n, L, D)                with `text_encode_fn`
"""

import glob
import json
import os

import keras
import numpy as np
import tensorflow as tf

from keras_minsnr.data import transforms
from keras_minsnr.data.info import DatasetInfo

MANIFEST = "manifest.json"
CACHE_FORMAT = "keras_minsnr.latent_cache"
# 2: the latents are what the autoencoder returns, and the manifest names the VAE, its
# scale and shift. Version 1 caches of the SD VAE held 0.18215² · μ (the factor twice).
CACHE_VERSION = 2
# load_latent_cache keeps caches up to this size in memory (see its `in_memory`).
IN_MEMORY_LIMIT_BYTES = 2 * 1024**3
_SHARD_PATTERNS = ("latents-*.npy", "labels-*.npy", "context-*.npy", "text-*.json")
NULL_CONTEXT_FILE = "null-context.npy"


def _atomic_write(path, write):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npy(path, array):
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _save_json(path, obj):
    data = json.dumps(obj, indent=2).encode("utf-8")
    _atomic_write(path, lambda f: f.write(data))


def read_manifest(cache_dir):
    """The manifest of a complete cache in `cache_dir`, or None when there is none."""
    path = os.path.join(os.fspath(cache_dir), MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path!r} is not a keras_minsnr latent cache manifest.")
    if manifest.get("version") != CACHE_VERSION:
        raise ValueError(stale_cache_message(cache_dir, manifest.get("version")))
    for shard in manifest["shards"]:
        for key in ("latents", "labels", "context", "text"):
            name = shard.get(key)
            if name and not os.path.isfile(os.path.join(os.fspath(cache_dir), name)):
                return None  # a shard went missing: treat as incomplete
    return manifest


def stale_cache_message(cache_dir, version):
    """One line: the cache in ``cache_dir`` has another format version; how to re-encode."""
    why = (" (its SD-VAE latents may carry the 0.18215 scale twice, and it does not record "
           "its VAE)" if version == 1 else "")
    return (
        f"The latent cache in {os.fspath(cache_dir)!r} has format version {version!r}, "
        f"this library reads version {CACHE_VERSION}{why}: re-encode it (remove the folder, "
        "or pass another data= folder, and run again with encode.source; in Python "
        "cache_latents(..., overwrite=True))."
    )


def same_convention(manifest, convention):
    """Whether a manifest's VAE, scale and shift are ``convention``'s."""
    return manifest.get("vae") == convention["vae"] and all(
        np.isclose(manifest.get(key, 0.0), convention[key], rtol=0, atol=1e-12)
        for key in ("scale", "shift")
    )


def describe_convention(convention):
    """``"VAE 'sd_vae' (scale 0.18215, shift 0.0)"`` (``"no named VAE"`` for callables)."""
    name = f"VAE {convention.get('vae')!r}" if convention.get("vae") else "no named VAE"
    return f"{name} (scale {convention.get('scale')}, shift {convention.get('shift', 0.0)})"


def non_finite_examples(cache_dir, limit=5):
    """``[(index, file, row)]`` of the first ``limit`` cached examples holding NaN or Inf.

    ``index`` counts examples over all shards in order; ``file`` is the shard's latents
    (or context) file and ``row`` the example's row in it. Reads the shards in slices.
    """
    manifest = read_manifest(cache_dir)
    if manifest is None:
        return []
    found, offset = [], 0
    for shard in manifest["shards"]:
        count = 0
        bad = set()
        for key in ("latents", "context"):
            if not shard.get(key):
                continue
            array = np.load(os.path.join(os.fspath(cache_dir), shard[key]), mmap_mode="r")
            count = len(array)
            for start in range(0, count, 1024):
                part = np.asarray(array[start : start + 1024]).reshape(
                    len(array[start : start + 1024]), -1)
                for row in np.flatnonzero(~np.isfinite(part).all(axis=1)):
                    bad.add((start + int(row), shard[key]))
        for row, name in sorted(bad):
            found.append((offset + row, name, row))
        offset += count
        if len(found) >= limit:
            break
    return found[:limit]


def _split_batch(batch):
    """(images, labels, text) from a batch dict, an (images, labels) tuple or images."""
    if isinstance(batch, dict):
        if "images" not in batch:
            raise ValueError(
                f"Batches must have an 'images' key; got keys {sorted(batch)}."
            )
        return batch["images"], batch.get("labels"), batch.get("text")
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None), None
    return batch, None, None


def _to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def cache_latents(
    dataset,
    encoder,
    cache_dir,
    scale=None,
    text_encode_fn=None,
    *,
    info=None,
    shard_size=50_000,
    overwrite=False,
    verbose=1,
):
    """Encodes a finite dataset once and writes the latents to `cache_dir`.

    Args:
        dataset: a finite iterable of batches (a `tf.data.Dataset` from this package,
            built with `shuffle=False, repeat=False, drop_remainder=False` to keep every
            example once): dicts with `"images"` in [-1, 1] and optional `"labels"` /
            `"text"`, `(images, labels)` tuples, or image arrays.
        encoder: an autoencoder of `keras_minsnr.backbones.autoencoders` (its
            `encode_images` output is stored as is, and its VAE, scale and shift are
            recorded), or any callable or Keras model mapping an image batch (numpy
            float32 `(B, H, W, C)` in [-1, 1]) to latents `(B, h, w, c)`.
        cache_dir: folder for the cache (created if needed).
        scale: callables only: the stored latents are `scale` times the callable's
            output (default 1), and the manifest records `scale` with no VAE name. An
            autoencoder declares its own scale; passing one with it is an error.
        text_encode_fn: optional callable mapping a list of captions (python str) to text
            embeddings `(B, L, D)`, stored as `"context"`.
        info: optional `DatasetInfo` of `dataset`, to keep `num_classes`/`class_names`.
        shard_size: a shard file is written once it holds at least this many examples
            (shards hold whole batches).
        overwrite: re-encode even when a complete cache exists.
        verbose: 1 shows a `keras.utils.Progbar`, 0 is silent.

    Returns:
        The manifest dict. A complete cache with the same VAE, scale and shift and the
        same kind of content is reused without encoding; a different one raises a
        `ValueError` unless `overwrite=True`.

    Example:
        >>> ds, info = image_folder_dataset("imgs/", 256, shuffle=False,
        ...                                 drop_remainder=False, batch_size=32)
        >>> vae = StableDiffusionAutoencoder("v1", image_encoder_weights="vae_encoder.h5",
        ...                                  text=False)
        >>> cache_latents(ds, vae, "cache/", info=info)  # 0.18215 · μ, recorded
        >>> train_ds, latent_info = load_latent_cache("cache/", batch_size=256)
    """
    convention = getattr(encoder, "convention", None)
    if convention is not None:
        if scale is not None:
            raise ValueError(
                f"scale={scale!r} was given with the autoencoder {convention['vae']!r}, "
                f"which applies its own scale {convention['scale']}; leave scale out."
            )
        encode_fn = encoder.encode_images
        scale = 1.0  # nothing more: the autoencoder's latents are stored as they are
    else:
        encode_fn = encoder
        if scale is None:
            scale = 1.0
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}.")
        convention = {"vae": None, "scale": float(scale), "shift": 0.0}
    if not callable(encode_fn):
        raise ValueError(f"encode_fn must be callable, got {encode_fn!r}.")
    if text_encode_fn is not None and not callable(text_encode_fn):
        raise ValueError(f"text_encode_fn must be callable, got {text_encode_fn!r}.")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}.")
    cache_dir = os.fspath(cache_dir)
    num_batches = None
    if isinstance(dataset, tf.data.Dataset):
        cardinality = int(dataset.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY:
            raise ValueError(
                "cache_latents needs a finite dataset; build it with repeat=False."
            )
        num_batches = cardinality if cardinality >= 0 else None
        dataset = dataset.as_numpy_iterator()

    if not overwrite:
        existing = read_manifest(cache_dir)
        if existing is not None:
            if not same_convention(existing, convention):
                raise ValueError(
                    f"The cache in {cache_dir!r} was written with "
                    f"{describe_convention(existing)}, not {describe_convention(convention)}; "
                    "pass overwrite=True or use another cache_dir."
                )
            if (existing["context_shape"] is not None) != (text_encode_fn is not None):
                raise ValueError(
                    f"The cache in {cache_dir!r} "
                    f"{'has' if existing['context_shape'] else 'has no'} text "
                    "embeddings but text_encode_fn says otherwise; pass "
                    "overwrite=True or use another cache_dir."
                )
            if verbose:
                print(f"Reusing the latent cache in {cache_dir} "
                      f"({existing['count']} examples).")
            return existing

    os.makedirs(cache_dir, exist_ok=True)
    stale = [os.path.join(cache_dir, MANIFEST), os.path.join(cache_dir, NULL_CONTEXT_FILE)]
    for pattern in _SHARD_PATTERNS:
        stale += glob.glob(os.path.join(cache_dir, pattern))
    for path in stale:
        if os.path.exists(path):
            os.remove(path)

    shards, pending = [], {"latents": [], "labels": [], "text": [], "context": []}
    state = {"count": 0, "latent_shape": None, "context_shape": None,
             "has_labels": None, "has_text": None}

    def flush():
        if not pending["latents"]:
            return
        index = len(shards)
        shard = {"count": int(sum(len(x) for x in pending["latents"]))}
        name = f"latents-{index:05d}.npy"
        _save_npy(os.path.join(cache_dir, name), np.concatenate(pending["latents"]))
        shard["latents"] = name
        if state["has_labels"]:
            name = f"labels-{index:05d}.npy"
            _save_npy(os.path.join(cache_dir, name), np.concatenate(pending["labels"]))
            shard["labels"] = name
        if state["has_text"]:
            name = f"text-{index:05d}.json"
            _save_json(os.path.join(cache_dir, name), sum(pending["text"], []))
            shard["text"] = name
        if pending["context"]:
            name = f"context-{index:05d}.npy"
            _save_npy(os.path.join(cache_dir, name), np.concatenate(pending["context"]))
            shard["context"] = name
        shards.append(shard)
        for value in pending.values():
            value.clear()

    progbar = keras.utils.Progbar(num_batches, verbose=verbose, unit_name="batch")
    for step, batch in enumerate(dataset):
        images, labels, text = _split_batch(batch)
        images = np.asarray(images, dtype=np.float32)
        latents = _to_numpy(encode_fn(images)).astype(np.float32) * np.float32(scale)
        if latents.ndim != 4 or latents.shape[0] != images.shape[0]:
            raise ValueError(
                f"encode_fn must map images {images.shape} to latents (B, h, w, c); "
                f"got shape {latents.shape}."
            )
        if state["latent_shape"] is None:
            state["latent_shape"] = list(latents.shape[1:])
            state["has_labels"] = labels is not None
            state["has_text"] = text is not None
        elif list(latents.shape[1:]) != state["latent_shape"]:
            raise ValueError(
                f"Latent shape changed from {state['latent_shape']} to "
                f"{list(latents.shape[1:])} at batch {step}."
            )
        pending["latents"].append(latents)
        if state["has_labels"]:
            pending["labels"].append(np.asarray(labels).astype(np.int32).reshape(-1))
        if state["has_text"]:
            captions = [
                t.decode("utf-8") if isinstance(t, bytes) else str(t)
                for t in np.asarray(text).reshape(-1).tolist()
            ]
            pending["text"].append(captions)
            if text_encode_fn is not None:
                context = _to_numpy(text_encode_fn(captions)).astype(np.float32)
                if context.ndim != 3 or context.shape[0] != len(captions):
                    raise ValueError(
                        "text_encode_fn must map B captions to (B, L, D); got shape "
                        f"{context.shape}."
                    )
                state["context_shape"] = list(context.shape[1:])
                pending["context"].append(context)
        elif text_encode_fn is not None:
            raise ValueError("text_encode_fn was given but the batches carry no 'text'.")
        state["count"] += latents.shape[0]
        if sum(len(x) for x in pending["latents"]) >= shard_size:
            flush()
        progbar.update(step + 1)
    flush()
    if state["count"] == 0:
        raise ValueError("cache_latents got an empty dataset.")
    null_context = None
    if state["context_shape"] is not None:
        # The empty caption's embedding: the "no text" condition of label dropout and
        # classifier-free guidance (what Stable Diffusion was trained with).
        empty = _to_numpy(text_encode_fn([""])).astype(np.float32)
        if list(empty.shape) != [1] + state["context_shape"]:
            raise ValueError(
                f"text_encode_fn(['']) returned shape {empty.shape}; expected "
                f"(1, {', '.join(map(str, state['context_shape']))})."
            )
        _save_npy(os.path.join(cache_dir, NULL_CONTEXT_FILE), empty[0])
        null_context = NULL_CONTEXT_FILE

    manifest = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "count": int(state["count"]),
        "latent_shape": state["latent_shape"],
        "dtype": "float32",
        "vae": convention["vae"],
        "scale": float(convention["scale"]),
        "shift": float(convention["shift"]),
        "has_labels": bool(state["has_labels"]),
        "has_text": bool(state["has_text"]),
        "context_shape": state["context_shape"],
        "null_context": null_context,
        "num_classes": None if info is None else info.num_classes,
        "class_names": None if info is None or info.class_names is None
        else list(info.class_names),
        "source_image_shape": None if info is None else list(info.image_shape),
        "shards": shards,
    }
    _save_json(os.path.join(cache_dir, MANIFEST), manifest)
    return manifest


def load_latent_cache(
    cache_dir,
    batch_size=64,
    *,
    shuffle=True,
    repeat=False,
    seed=None,
    drop_remainder=True,
    in_memory=None,
    include_text=None,
):
    """A pipeline of batch dicts over a cache written by `cache_latents`.

    Args:
        cache_dir: the cache folder (must hold a complete `manifest.json`).
        batch_size: examples per batch.
        shuffle: a fresh seeded permutation of all examples every epoch.
        repeat: repeat forever.
        seed: seed for the order (None: random).
        drop_remainder: drop the last partial batch.
        in_memory: load the whole cache into memory and gather batches inside
            `tf.data` (fast); otherwise batches are read from memory-mapped shards by a
            Python generator (for caches larger than memory). None: in memory when the
            arrays take at most `IN_MEMORY_LIMIT_BYTES`. The two modes shuffle with
            different (each deterministic) permutations.
        include_text: yield the cached captions as `"text"`. None: only when no text
            embeddings were cached (string tensors cannot be fed to JAX, and with a
            `"context"` the captions are not needed for training).

    Returns:
        `(dataset, info)`: batches `{"images": float32 (B, h, w, c)}` (the latents as
        the autoencoder returned them), plus `"labels"` int32 (B,), `"text"` tf.string
        (B,) and `"context"` float32 (B, L, D) when cached; `info.vae`, `info.latent_scale` and
        `info.latent_shift` name the VAE and its convention (decode with its `decode`).

    Example:
        >>> ds, info = load_latent_cache("cache/", batch_size=256, repeat=True, seed=0)
    """
    cache_dir = os.fspath(cache_dir)
    if not os.path.isdir(cache_dir):
        raise FileNotFoundError(f"Latent cache folder {cache_dir!r} does not exist.")
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise FileNotFoundError(
            f"{cache_dir!r} holds no complete latent cache (no valid {MANIFEST}); "
            "run cache_latents(...) first."
        )
    batch_size = transforms.check_batch_size(batch_size)
    if batch_size is None:
        raise ValueError("load_latent_cache needs a batch_size, got None.")
    seed = transforms.resolve_seed(seed)

    def load(key):
        return [np.load(os.path.join(cache_dir, s[key]), mmap_mode="r")
                for s in manifest["shards"]]

    latents = load("latents")
    labels = load("labels") if manifest["has_labels"] else None
    context = load("context") if manifest["context_shape"] else None
    texts = None
    if include_text is None:
        include_text = not manifest["context_shape"]
    if manifest["has_text"] and include_text:
        texts = []
        for s in manifest["shards"]:
            with open(os.path.join(cache_dir, s["text"]), encoding="utf-8") as f:
                texts.extend(t.encode("utf-8") for t in json.load(f))
        texts = np.asarray(texts, dtype=object)
    starts = np.cumsum([0] + [len(x) for x in latents])
    count = int(starts[-1])
    info = DatasetInfo(
        name=cache_dir,
        image_shape=tuple(manifest["latent_shape"]),
        num_classes=manifest["num_classes"],
        class_names=None if manifest["class_names"] is None
        else tuple(manifest["class_names"]),
        size=count,
        has_text=texts is not None,
        latent_scale=manifest["scale"],
        latent_shift=manifest["shift"],
        vae=manifest["vae"],
        context_shape=None if manifest["context_shape"] is None
        else tuple(manifest["context_shape"]),
        null_context_file=os.path.join(cache_dir, manifest["null_context"])
        if manifest.get("null_context") else None,
    )
    nbytes = sum(a.nbytes for group in (latents, labels or [], context or [])
                 for a in group)
    if in_memory is None:
        in_memory = nbytes <= IN_MEMORY_LIMIT_BYTES
    if in_memory:
        arrays = {"images": tf.constant(np.concatenate(latents))}
        if labels is not None:
            arrays["labels"] = tf.constant(np.concatenate(labels))
        if texts is not None:
            arrays["text"] = tf.constant(list(texts), dtype=tf.string)
        if context is not None:
            arrays["context"] = tf.constant(np.concatenate(context))
        ds = transforms.build_array_pipeline(
            arrays,
            batch_size=batch_size,
            shuffle=shuffle,
            repeat=repeat,
            seed=seed,
            drop_remainder=drop_remainder,
        )
        return ds, info

    def gather(arrays, index):
        shard = np.searchsorted(starts, index, side="right") - 1
        out = np.empty((len(index),) + arrays[0].shape[1:], arrays[0].dtype)
        for s in np.unique(shard):
            where = shard == s
            local = index[where] - starts[s]
            order = np.argsort(local)  # sorted reads are kinder to memory maps
            out[np.flatnonzero(where)[order]] = arrays[s][local[order]]
        return out

    def batches():
        epoch = 0
        while True:
            if shuffle:
                order = np.random.default_rng([seed, epoch]).permutation(count)
            else:
                order = np.arange(count)
            stop = count - count % batch_size if drop_remainder else count
            for begin in range(0, stop, batch_size):
                index = order[begin : begin + batch_size]
                batch = {"images": gather(latents, index)}
                if labels is not None:
                    batch["labels"] = gather(labels, index)
                if texts is not None:
                    batch["text"] = texts[index]
                if context is not None:
                    batch["context"] = gather(context, index)
                yield batch
            epoch += 1
            if not repeat:
                return

    batch_dim = batch_size if drop_remainder else None
    signature = {
        "images": tf.TensorSpec(
            (batch_dim, *manifest["latent_shape"]), tf.float32
        )
    }
    if labels is not None:
        signature["labels"] = tf.TensorSpec((batch_dim,), tf.int32)
    if texts is not None:
        signature["text"] = tf.TensorSpec((batch_dim,), tf.string)
    if context is not None:
        signature["context"] = tf.TensorSpec(
            (batch_dim, *manifest["context_shape"]), tf.float32
        )
    ds = tf.data.Dataset.from_generator(batches, output_signature=signature)
    if repeat:
        num = tf.data.INFINITE_CARDINALITY
    else:
        num = count // batch_size if drop_remainder else -(-count // batch_size)
    ds = ds.apply(tf.data.experimental.assert_cardinality(num))
    ds = transforms.finalize(ds, None)
    return ds, info
