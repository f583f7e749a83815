"""The only backend-specific code: gradient tape on TensorFlow, stateless steps on JAX.

`DiffusionModel` describes one training step as a pure function of a batch
(`DiffusionModel.compute_training_loss`) that reads variables and draws random numbers
through Keras. This module turns it into a train / test step for each backend:

- TensorFlow: `tf.GradientTape`; whether the loss is finite is decided from the loss
  summed over all replicas, so every replica takes the same branch, and the optimizer
  and EMA update runs in a `tf.cond` taken in the cross-replica context (a `tf.cond`
  around `optimizer.apply` inside a replica fails under `tf.distribute`, as the apply
  synchronises the replicas; Keras' `LossScaleOptimizer` does the same).
- JAX: the same function under a `keras.StatelessScope`, differentiated with
  `jax.value_and_grad`; a non-finite loss selects the old state.

With gradient accumulation the optimizer applies an update every N-th call; the EMA
moves only then, and its warm-up counts real updates.

It also compiles sampling steps and loops (`compile_function`: XLA on both backends).
"""

import contextlib
import json
import os
import warnings

import keras
import numpy as np
from keras import ops

SUPPORTED_BACKENDS = ("tensorflow", "jax")


def check_backend():
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise RuntimeError(
            f"keras_minsnr supports the Keras backends {', '.join(SUPPORTED_BACKENDS)}; "
            f"the current backend is {backend!r}. Set KERAS_BACKEND=jax or "
            "KERAS_BACKEND=tensorflow before importing keras."
        )
    return backend


def process_index():
    """This process's index in a multi-host run (0 on one host).

    JAX: `jax.process_index()`; TensorFlow: the task index of ``TF_CONFIG`` (the chief
    of a `MultiWorkerMirroredStrategy` cluster is worker 0).
    """
    if keras.backend.backend() == "jax":
        import jax

        return int(jax.process_index())
    task = json.loads(os.environ.get("TF_CONFIG") or "{}").get("task") or {}
    return int(task.get("index", 0))


_MULTI_WORKER_STRATEGY = []


def multi_worker_strategy():
    """This process's `tf.distribute.MultiWorkerMirroredStrategy` (from ``TF_CONFIG``).

    Made once per process, and it must be made before anything starts TensorFlow's
    runtime (lists devices, makes a tensor): it configures the collective ops, which
    TensorFlow accepts only at startup. The CLI makes it first thing for ``--multihost``
    on TensorFlow; in Python call this before building anything.
    """
    if not _MULTI_WORKER_STRATEGY:
        import tensorflow as tf

        try:
            _MULTI_WORKER_STRATEGY.append(tf.distribute.MultiWorkerMirroredStrategy())
        except RuntimeError as error:
            if "program startup" not in str(error):
                raise
            raise RuntimeError(
                "multihost on TensorFlow: the MultiWorkerMirroredStrategy must be made "
                "before TensorFlow starts its runtime; call "
                "keras_minsnr.backend.multi_worker_strategy() first thing in the program."
            ) from error
    return _MULTI_WORKER_STRATEGY[0]


def process_count():
    """How many processes run this program together (1 on one host).

    JAX: `jax.process_count()`; TensorFlow: the workers of ``TF_CONFIG``'s cluster.
    """
    if keras.backend.backend() == "jax":
        import jax

        return int(jax.process_count())
    cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster") or {}
    return max(sum(len(tasks) for tasks in cluster.values()), 1)


def has_collectives():
    """Whether `barrier`, `broadcast_from_first` and `gather_from_all` reach the other
    processes (JAX); on TensorFlow they act on this process alone."""
    return keras.backend.backend() == "jax"


def barrier(name):
    """Waits until every process of a multi-process JAX run reaches ``name``.

    A no-op with one process. On TensorFlow the workers meet in the collectives of
    `MultiWorkerMirroredStrategy` instead: nothing to do here.
    """
    if keras.backend.backend() != "jax" or process_count() == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def broadcast_from_first(values):
    """Process 0's ``values`` (a small integer numpy array) on every JAX process."""
    if keras.backend.backend() != "jax" or process_count() == 1:
        return np.asarray(values)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(values)))


def gather_from_all(value):
    """``[each process's value]`` of a small numpy array, the same list on every process."""
    if keras.backend.backend() != "jax" or process_count() == 1:
        return [np.asarray(value)]
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(value), tiled=False)
    return list(np.asarray(gathered))


def spans_other_hosts(value):
    """Whether part of an array lives only on other processes' devices (a shard no
    local device holds); such an array cannot be read here without `host_value`."""
    if keras.backend.backend() != "jax":
        return False
    addressable = getattr(value, "is_fully_addressable", True)
    return not addressable and not getattr(value, "is_fully_replicated", False)


def host_value(value):
    """A numpy copy of a whole array, gathered from every process when it is split.

    Every process must call it for a split array (it is a collective); an array this
    process holds whole is read locally.
    """
    if not spans_other_hosts(value):
        return np.asarray(keras.ops.convert_to_numpy(value))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def state_variables(model):
    """Every variable of ``model`` and of its optimizer (slots, iterations), each once:
    the whole training state."""
    variables = list(model.variables)
    if getattr(model, "optimizer", None) is not None:
        seen = {id(v) for v in variables}
        variables += [v for v in model.optimizer.variables if id(v) not in seen]
    return variables


@contextlib.contextmanager
def readable_variables(model):
    """A scope in which every variable of ``model`` (and its optimizer) holds a whole
    array on this process, so that `model.save` and `convert_to_numpy` work on arrays
    split over several hosts. Gathers those arrays from every process on entry (all
    processes must enter it together) and puts the split ones back on exit. Nothing is
    gathered when no array is split.
    """
    split = [v for v in state_variables(model) if spans_other_hosts(v.value)]
    if not split:
        yield
        return
    import jax

    gathered = [jax.device_put(host_value(v.value), jax.local_devices()[0]) for v in split]
    originals = [v._value for v in split]
    try:
        # Keras' JAX variables keep their array in `_value`; swapping it (no `assign`,
        # which would lay the whole array out again over every device) is undone below.
        for variable, value in zip(split, gathered):
            variable._value = value
        yield
    finally:
        for variable, value in zip(split, originals):
            variable._value = value


@contextlib.contextmanager
def one_process_only():
    """A scope for what only one process of a multi-host run does (saving a file).

    Under a `keras.distribution` every variable Keras makes is laid out over all
    processes' devices, which is a collective (`model.save` makes a throw-away
    optimizer): run by one process alone it would wait for the others forever. Inside,
    no distribution is set.
    """
    if keras.backend.backend() != "jax" or keras.distribution.distribution() is None:
        yield
        return
    active = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(active)


def replica_position():
    """``(index, count)`` of the replica running this code under `tf.distribute`.

    ``(0, 1)`` on one device and on JAX, where a `keras.distribution` step sees the
    global batch. A `tf.distribute` replica sees only its slice of the global batch, but
    the same mirrored random state as every other replica.
    """
    if keras.backend.backend() != "tensorflow":
        return 0, 1
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return 0, 1
    return context.replica_id_in_sync_group, context.num_replicas_in_sync


def compile_function(fn, jit_compile=True):
    """Compiles a pure function of tensors: `jax.jit`, or a `tf.function` on TensorFlow.

    On TensorFlow ``jit_compile=True`` (the default) compiles with XLA, which samples
    1.3-1.6x faster on CPU (docs/performance.md); a function XLA cannot compile (an op
    without an XLA kernel) falls back to a plain `tf.function` once, with a warning.
    ``jit_compile`` has no effect on JAX, which always compiles with XLA.
    """
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    import tensorflow as tf

    if not jit_compile:
        return tf.function(fn, reduce_retracing=True)
    return _XlaOrGraphFunction(fn)


class _XlaOrGraphFunction:
    """A `tf.function` with XLA that becomes one without XLA if XLA refuses the function."""

    def __init__(self, fn):
        import tensorflow as tf

        self.__name__ = getattr(fn, "__name__", "function")
        self._fn = fn
        self._compiled = tf.function(fn, reduce_retracing=True, jit_compile=True)
        self.uses_xla = True

    def __call__(self, *args):
        if not self.uses_xla:
            return self._compiled(*args)
        import tensorflow as tf

        try:
            return self._compiled(*args)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
            message = str(error)
            if "XLA" not in message and "compile" not in message:
                raise
            first_line = message.strip().splitlines()[0][:300]
            warnings.warn(
                f"XLA cannot compile {self.__name__} ({first_line}); it runs as a "
                "tf.function without XLA instead.",
                stacklevel=2,
            )
            self.uses_xla = False
            self._compiled = tf.function(self._fn, reduce_retracing=True)
            return self._compiled(*args)


def _call_counter(optimizer):
    """The optimizer's count of `apply` calls and its gradient accumulation steps.

    ``optimizer.iterations`` counts real updates (calls // steps) and is a tensor, not a
    variable, under gradient accumulation; the variable behind it counts the calls.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
    return inner._iterations, int(inner.gradient_accumulation_steps or 1)


def _ema_after_apply(model, averages, weights, calls):
    """New EMA values once the optimizer has made its ``calls``-th call (a tensor).

    Only a call that applied an update moves the EMA; its warm-up counts updates.
    """
    _, steps = _call_counter(model.optimizer)
    new = model.ema.updated(averages, weights, calls // steps)
    if steps == 1:
        return new
    updated = ops.equal(calls % steps, 0)
    return [ops.where(updated, n, a) for n, a in zip(new, averages)]


# -- TensorFlow ------------------------------------------------------------------------


def train_step_tensorflow(model, data):
    import tensorflow as tf

    optimizer = model.optimizer
    variables = model.trainable_variables
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    with tf.GradientTape() as tape:
        loss, aux = model.compute_training_loss(data, training=True)
        # The optimizer sums the replicas' gradients: scale to the global mean.
        scaled_loss = optimizer.scale_loss(loss / replicas)
    grads = tape.gradient(scaled_loss, variables)
    context = tf.distribute.get_replica_context()
    finite = tf.math.is_finite(context.all_reduce(tf.distribute.ReduceOp.SUM, loss))
    pairs = model.ema.pairs(variables) if model.ema is not None else []
    counter, _ = _call_counter(optimizer)

    def update(grads):
        optimizer.apply(grads, variables)
        if pairs:
            averages = [a for _, a in pairs]
            weights = [variables[j] for j, _ in pairs]
            new = _ema_after_apply(model, averages, weights, counter)
            for average, value in zip(averages, new):
                average.assign(value)

    def guarded_update(distribution, finite, grads):
        # Every replica computed the same `finite` from the summed loss.
        finite = distribution.experimental_local_results(finite)[0]

        def apply():
            distribution.extended.call_for_each_replica(update, args=(grads,))
            return tf.constant(True)

        tf.cond(finite, apply, lambda: tf.constant(False))

    context.merge_call(guarded_update, args=(finite, grads))
    return _reducible_across_workers(model.update_metrics(loss, aux))


def adam_scalars_tensorflow(optimizer, learning_rate):
    """The scalars of one Adam update (`adam_update_tensorflow`), made once per update.

    Keras' `Adam.update_step` makes them per weight, in the weight's dtype; here they are
    made per dtype, on first use.
    """
    import tensorflow as tf

    cache = {}

    def scalars(dtype):
        if dtype not in cache:
            step = tf.cast(optimizer.iterations + 1, dtype)
            beta_1 = tf.cast(optimizer.beta_1, dtype)
            beta_2 = tf.cast(optimizer.beta_2, dtype)
            cache[dtype] = dict(
                beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
                lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
                epsilon=tf.cast(optimizer.epsilon, dtype))
        return cache[dtype]

    return scalars


def adam_update_tensorflow(variable, momentum, velocity, gradient, scalars):
    """One weight's Adam update as TensorFlow's fused ``ResourceApplyAdam`` kernel: the
    formula of Keras' `Adam.update_step`, in one pass over the weight and its slots."""
    import tensorflow as tf

    dtype = variable.dtype
    tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=momentum.handle, v=velocity.handle,
        # An embedding's gradient arrives as IndexedSlices; the kernel takes it dense, as
        # Keras' update densifies it.
        grad=tf.cast(tf.convert_to_tensor(gradient), dtype), use_locking=False,
        use_nesterov=False,
        **scalars(dtype))


def decay_weights_tensorflow(optimizer, variables):
    """AdamW's decoupled weight decay ``w -= w·wd·lr`` as Keras applies it (its order of
    multiplication, each replica's copy through the strategy), with the learning rate
    read once per update rather than once per weight."""
    import tensorflow as tf

    lr = optimizer.learning_rate
    factors = {}

    def decay(distribution, variables):
        for variable in variables:
            if isinstance(variable, keras.Variable):
                variable = variable.value
            dtype = variable.dtype
            if dtype not in factors:
                factors[dtype] = (tf.cast(optimizer.weight_decay, dtype), tf.cast(lr, dtype))
            distribution.extended.update(
                variable, lambda v, wd, lr: v.assign_sub(v * wd * lr),
                args=factors[dtype], group=False)

    tf.__internal__.distribute.interim.maybe_merge_call(
        decay, optimizer._distribution_strategy, variables)


def _reducible_across_workers(logs):
    """The step's logs in a shape Keras can average over several workers.

    With a multi-worker strategy Keras averages each log with
    ``strategy.reduce("MEAN", value, axis=0)``, which fails on a scalar
    (tensorflow/tensorflow#72388); a ``(1,)`` value averages to the same scalar.
    """
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    in_multi_worker_mode = getattr(strategy.extended, "_in_multi_worker_mode", None)
    if not (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and in_multi_worker_mode and in_multi_worker_mode()):
        return logs
    return {name: tf.reshape(value, (1,)) for name, value in logs.items()}


def first_local_batch(epoch_iterator):
    """The first batch of a Keras TensorFlow epoch iterator, as this process's first
    replica holds it (only its shapes are used: to build the model before training).

    Keras reduces the replicas' batches with one `strategy.reduce` over the whole dict,
    which a `MultiWorkerMirroredStrategy` refuses (keras-team/keras#20329); each
    replica's slice has the shapes that building needs, without a collective.
    """
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    for _, _, iterator in epoch_iterator:
        batch = next(iterator)
        return tf.nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0]
            if isinstance(v, tf.distribute.DistributedValues) else v, batch)
    return None


def test_step_tensorflow(model, data):
    loss, aux = model.compute_evaluation_loss(data)
    return _reducible_across_workers(model.update_metrics(loss, aux))


# -- JAX --------------------------------------------------------------------------------


def _stateless(model, trainable, non_trainable, fn, extra_mapping=()):
    """Runs ``fn()`` with the model's variables bound to the given values.

    Returns ``fn``'s result and the new values of the non-trainable variables (the seed
    generator advances in there).
    """
    mapping = list(zip(model.trainable_variables, trainable))
    mapping += list(zip(model.non_trainable_variables, non_trainable))
    mapping += list(extra_mapping)
    with keras.StatelessScope(state_mapping=mapping) as scope:
        result = fn()
    new_non_trainable = [
        _current(scope, v, old) for v, old in zip(model.non_trainable_variables, non_trainable)
    ]
    return result, new_non_trainable


def _current(scope, variable, fallback):
    value = scope.get_current_value(variable)
    return fallback if value is None else value


def _update_metrics_stateless(model, metrics_values, loss, aux):
    mapping = list(zip(model.metrics_variables, metrics_values))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        logs = model.update_metrics(loss, aux)
    new = [_current(scope, v, old) for v, old in zip(model.metrics_variables, metrics_values)]
    return logs, new


def train_step_jax(model, state, data):
    import jax

    trainable, non_trainable, optimizer_values, metrics_values = state
    optimizer_mapping = list(zip(model.optimizer.variables, optimizer_values))

    def loss_fn(trainable_values):
        def forward():
            loss, aux = model.compute_training_loss(data, training=True)
            return model.optimizer.scale_loss(loss), (loss, aux)

        (scaled, (loss, aux)), new_nt = _stateless(
            model, trainable_values, non_trainable, forward, optimizer_mapping
        )
        return scaled, (loss, aux, new_nt)

    (_, (loss, aux, new_non_trainable)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable
    )
    new_trainable, new_optimizer = model.optimizer.stateless_apply(
        optimizer_values, grads, trainable
    )
    # A non-finite loss keeps the old weights, optimizer state and EMA (the seed still
    # advances so the next step draws fresh noise).
    finite = jax.numpy.isfinite(loss)
    keep = lambda new, old: jax.numpy.where(finite, new, old)  # noqa: E731
    if model.ema is not None:
        # Each EMA copy is found by its weight, so frozen weights (absent from the
        # trainable list) and their copies are left alone.
        position = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
        pairs = model.ema.pairs(model.trainable_variables)
        ema_positions = [position[id(a)] for _, a in pairs]
        counter, _ = _call_counter(model.optimizer)
        optimizer_ids = [id(v) for v in model.optimizer.variables]
        calls = new_optimizer[optimizer_ids.index(id(counter))]
        old_ema = [non_trainable[i] for i in ema_positions]
        weights = [new_trainable[j] for j, _ in pairs]
        new_ema = _ema_after_apply(model, old_ema, weights, calls)
        for i, new, old in zip(ema_positions, new_ema, old_ema):
            new_non_trainable[i] = keep(new, old)
    new_trainable = jax.tree_util.tree_map(keep, new_trainable, trainable)
    new_optimizer = jax.tree_util.tree_map(keep, new_optimizer, optimizer_values)
    logs, new_metrics = _update_metrics_stateless(model, metrics_values, loss, aux)
    return logs, (new_trainable, new_non_trainable, new_optimizer, new_metrics)


def test_step_jax(model, state, data):
    trainable, non_trainable, metrics_values = state
    (loss, aux), new_non_trainable = _stateless(
        model, trainable, non_trainable, lambda: model.compute_evaluation_loss(data)
    )
    logs, new_metrics = _update_metrics_stateless(model, metrics_values, loss, aux)
    return logs, (trainable, new_non_trainable, new_metrics)
