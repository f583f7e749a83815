"""The exponential moving average of a backbone's trainable weights, paired by variable."""

import keras
from keras import ops


class _Sources:
    """Plain holder, so that Keras does not track the backbone's weights a second time."""

    def __init__(self):
        self.weights = []


@keras.saving.register_keras_serializable(package="keras_minsnr")
class ExponentialMovingAverage(keras.layers.Layer):
    """EMA copies of a backbone's trainable weights, one per weight, paired by variable.

    Each copy is a non-trainable variable whose path is ``<ema path>/<weight path>``, so
    a `keras.distribution.LayoutMap` regex written for a weight also matches its average.
    Copies exist only for weights that are trainable when `track` sees them; a weight
    frozen later keeps its copy (not updated while frozen) until `sync` drops it, a weight
    unfrozen later gets one on the next `track`. The copies are recorded by their index in
    ``backbone.weights`` (stable across save/load), which `DiffusionModel` serialises.

    Args:
        decay: the decay ``β`` of ``ema ← β·ema + (1 − β)·weight`` (paper: 0.9999).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at update ``n`` so the average is
            useful early in training.

    Example:
    ```python
    ema = ExponentialMovingAverage(0.9999)
    ema.track(backbone)                 # copies of backbone.trainable_variables
    ema.average_of(backbone.trainable_variables[0])
    ```

    Reference:
        Polyak and Juditsky, 1992; the decay warm-up follows TensorFlow's
        `ExponentialMovingAverage(num_updates=...)`.
    """

    def __init__(self, decay=0.9999, warmup=True, name="ema", **kwargs):
        super().__init__(name=name, **kwargs)
        decay = float(decay)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}.")
        self.decay = decay
        self.warmup = bool(warmup)
        self.averages = []
        self.weight_indices = []
        self._sources = _Sources()
        self._index_of = {}
        self.loaded_by_parent = False  # set by DiffusionModel reading an older file
        self.built = True

    def track(self, backbone, indices=None):
        """Adds a copy for each trainable backbone weight that has none yet.

        ``indices`` (positions in ``backbone.weights``) picks the weights instead, e.g. to
        recreate the copies of a saved model in their saved order.
        """
        weights = backbone.weights
        if indices is None:
            trainable = {id(v) for v in backbone.trainable_variables}
            indices = [i for i, v in enumerate(weights) if id(v) in trainable]
        for i in indices:
            if not 0 <= i < len(weights):
                raise ValueError(
                    f"EMA weight index {i} is outside the backbone's {len(weights)} weights."
                )
            weight = weights[i]
            if id(weight) in self._index_of:
                continue
            self._index_of[id(weight)] = len(self.averages)
            self._sources.weights.append(weight)
            self.weight_indices.append(int(i))
            self.averages.append(self._make_copy(weight))

    def sync(self, backbone):
        """Keeps copies of the trainable backbone weights only: drops the others, adds new.

        For a change of what trains that is for good, such as LoRA (the base weights
        frozen, adapters added) or merging the adapters back (adapters gone): a frozen
        weight's copy would only hold memory, and the positions in ``backbone.weights``
        of the kept copies are recomputed, since removed weights shift them.
        """
        trainable = {id(v) for v in backbone.trainable_variables}
        for k in reversed(range(len(self.averages))):
            if id(self._sources.weights[k]) not in trainable:
                self.averages.pop(k)
                self._sources.weights.pop(k)
        position = {id(w): i for i, w in enumerate(backbone.weights)}
        self.weight_indices[:] = [position[id(w)] for w in self._sources.weights]
        self._index_of = {id(w): k for k, w in enumerate(self._sources.weights)}
        self.track(backbone)

    def _make_copy(self, weight):
        # The copy's path is "<this layer's name>/<weight path>".
        parent, _, leaf = f"{self.name}/{weight.path}".rpartition("/")
        grandparent, _, last = parent.rpartition("/")
        with keras.name_scope(last, override_parent=grandparent):
            # A copy: on JAX the average must not share the weight's buffer, since the
            # trainer donates both to the compiled step.
            return keras.Variable(
                ops.copy(weight.value),
                dtype=weight.dtype,
                trainable=False,
                name=leaf,
                # Replicas hold equal copies; under tf.distribute an update from a
                # replica then writes the first replica's value.
                aggregation="only_first_replica",
            )

    def average_of(self, weight):
        """The EMA variable of a backbone weight, or None."""
        i = self._index_of.get(id(weight))
        return None if i is None else self.averages[i]

    def pairs(self, weights):
        """``(position in weights, average)`` for each of ``weights`` that has a copy."""
        return [
            (j, self.averages[self._index_of[id(w)]])
            for j, w in enumerate(weights)
            if id(w) in self._index_of
        ]

    def reset(self):
        """Copies the current weight values into their averages."""
        for weight, average in zip(self._sources.weights, self.averages):
            average.assign(ops.copy(weight.value))

    def decay_at(self, step):
        """The decay used at update number ``step`` (1-based; a tensor)."""
        if not self.warmup:
            return ops.convert_to_tensor(self.decay, "float32")
        step = ops.cast(step, "float32")
        return ops.minimum(self.decay, (1.0 + step) / (10.0 + step))

    def updated(self, averages, weights, step):
        """New values of ``averages`` after one update towards ``weights`` (tensors)."""
        decay = self.decay_at(step)
        return [
            ops.cast(decay, a.dtype) * a + ops.cast(1.0 - decay, a.dtype) * ops.cast(w, a.dtype)
            for a, w in zip(averages, weights)
        ]

    def load_own_variables(self, store):
        if self.loaded_by_parent and not len(store.keys()):
            return
        super().load_own_variables(store)

    def get_config(self):
        return {**super().get_config(), "decay": self.decay, "warmup": self.warmup}
