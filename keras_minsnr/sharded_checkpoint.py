"""Sharded checkpoints (``checkpoint_format: orbax``): each host writes its own shards.

A ``.keras`` file holds whole arrays, so saving one gathers every split array onto one
host: the whole model, EMA and optimizer state in one host's memory. An Orbax checkpoint
(``checkpoints/step-N.orbax/``) is written by every process at once, each its own
shards, into one folder that all hosts see; Orbax writes it under a temporary name and
renames it when every process is done, so a killed run never leaves a half checkpoint
under the real name. `keras_minsnr.checkpointing` keeps its sidecar ``step-N.json`` and
``state.json`` as for ``.keras`` files.

What is saved is every variable of the model and its optimizer: weights, EMA copies,
random-generator states, optimizer slots and step. A restore lays every array out as the
model being restored into has it (`jax.ShapeDtypeStruct` with its sharding), so a
checkpoint written on a 2-host ``1x2`` mesh restores on one device and the other way
round. JAX only: on TensorFlow use ``checkpoint_format: keras``.
"""

import os

import keras

from keras_minsnr import backend


def _check_available():
    if keras.backend.backend() != "jax":
        raise ValueError(
            "checkpoint_format=orbax needs KERAS_BACKEND=jax (sharded arrays are JAX "
            f"arrays); the backend is {keras.backend.backend()!r}: use "
            "checkpoint_format=keras."
        )
    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError:
        raise ValueError(
            "checkpoint_format=orbax needs the orbax-checkpoint package: pip install "
            "'keras-minsnr[scale]' (or checkpoint_format=keras)."
        ) from None


def check_available():
    """Raises `ValueError` (one line) where Orbax checkpoints cannot be written."""
    _check_available()


def _variables(model):
    """Every variable of the model and its optimizer, in a fixed order.

    A checkpoint names its arrays by position in this list, not by path: Keras makes
    paths unique within a process (``di_t``, then ``di_t_1``), so the same model built
    in another process may have other paths.
    """
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    return backend.state_variables(model)


def _key(index):
    return f"{index:06d}"


def save(model, path):
    """Writes ``model``'s whole state to the folder ``path``; every process calls it."""
    _check_available()
    import orbax.checkpoint as ocp

    tree = {_key(i): v.value for i, v in enumerate(_variables(model))}
    with ocp.StandardCheckpointer() as checkpointer:
        # force: a folder of this step left by an abandoned branch of the run is replaced.
        checkpointer.save(os.path.abspath(path), tree, force=True)
        checkpointer.wait_until_finished()


def restore(model, path):
    """Loads the checkpoint folder ``path`` into ``model`` (built and compiled), each
    array laid out as the model's variable is (the restore reshards). The learning rate
    stays the model's: it comes from the run's config, which may change on resume."""
    _check_available()
    import jax
    import orbax.checkpoint as ocp

    variables = _variables(model)
    abstract = {
        _key(i): jax.ShapeDtypeStruct(v.shape, v.value.dtype, sharding=v.value.sharding)
        for i, v in enumerate(variables)
    }
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(os.path.abspath(path), abstract)
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # loss scale
    learning_rate = getattr(optimizer, "_learning_rate", None)
    for i, variable in enumerate(variables):
        if variable is not learning_rate:
            variable.assign(restored[_key(i)])
    return model
