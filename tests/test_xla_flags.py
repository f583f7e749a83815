"""The XLA:CPU fusion flag is set exactly when it helps and is safe (see xla_flags)."""

import io
import os
import subprocess
import sys

import pytest

from keras_minsnr import xla_flags


@pytest.fixture
def fresh_jax(monkeypatch):
    """Pretend JAX has made no device yet and the jaxlib is a verified one, no plugins."""
    monkeypatch.setattr(xla_flags, "_jax_devices_created", lambda: False)
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: xla_flags.VERIFIED_JAXLIB[0])
    monkeypatch.setattr(xla_flags.importlib.util, "find_spec", lambda name: None)


def test_adds_the_flag_once_and_says_so(fresh_jax):
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    stream = io.StringIO()
    assert xla_flags.configure("jax", environ, stream)
    assert environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x " + xla_flags.FUSION_FLAG
    assert environ[xla_flags.ADDED_VARIABLE] == xla_flags.FUSION_FLAG
    assert "KERAS_MINSNR_XLA_CPU_FLAGS=0" in stream.getvalue()
    # A second import, or a child process inheriting the variables, keeps one copy.
    xla_flags.configure("jax", environ, io.StringIO())
    assert environ["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_a_child_that_splits_the_cpu_into_devices_drops_the_inherited_flag(fresh_jax):
    # Sharded programs fail with the flag ("unsupported layout in YNN fusion"), so a child
    # process that asks for 8 CPU devices must not keep what its parent added.
    parent = {}
    assert xla_flags.configure("jax", parent, io.StringIO())
    child = dict(parent)
    child["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
    assert not xla_flags.configure("jax", child, io.StringIO())
    assert child["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    assert xla_flags.ADDED_VARIABLE not in child
    # A flag the user set themselves stays, whatever the device count.
    own = {"XLA_FLAGS": xla_flags.FUSION_FLAG + " --xla_force_host_platform_device_count=8"}
    assert not xla_flags.configure("jax", own, io.StringIO())
    assert own["XLA_FLAGS"].startswith(xla_flags.FUSION_FLAG)


def test_a_run_that_splits_its_weights_takes_the_flag_out_before_jax_starts(fresh_jax,
                                                                          monkeypatch):
    # One device per process, but a model axis over several processes (--multihost
    # --mesh 1x2): the flag is in, and only the run's config says it must go.
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert xla_flags.configure("jax", environ, io.StringIO())
    for kept in (("data_parallel", (2, 1)), ("model_parallel", (2, 1)), ("none", None)):
        assert not xla_flags.withdraw_for_mesh(*kept, environ=environ)
        assert xla_flags.FUSION_FLAG in environ["XLA_FLAGS"]
    assert xla_flags.withdraw_for_mesh("model_parallel", (1, 2), environ=environ)
    assert environ == {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    # FSDP splits every large weight over the data axis, whatever the mesh.
    assert xla_flags.configure("jax", environ, io.StringIO())
    assert xla_flags.withdraw_for_mesh("fsdp", None, environ=environ)
    assert environ == {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    # A flag the user set stays; after JAX started it is too late, and said so.
    own = {"XLA_FLAGS": xla_flags.FUSION_FLAG}
    assert not xla_flags.withdraw_for_mesh("model_parallel", (1, 2), environ=own)
    assert own == {"XLA_FLAGS": xla_flags.FUSION_FLAG}
    xla_flags.configure("jax", own := {}, io.StringIO())
    monkeypatch.setattr(xla_flags, "_jax_devices_created", lambda: True)
    with pytest.raises(RuntimeError, match="KERAS_MINSNR_XLA_CPU_FLAGS=0"):
        xla_flags.withdraw_for_mesh("model_parallel", (1, 2), environ=own)


@pytest.mark.parametrize(
    "backend, environ, reason",
    [
        ("tensorflow", {}, "backend is tensorflow"),
        ("jax", {"KERAS_MINSNR_XLA_CPU_FLAGS": "0"}, "=0"),
        ("jax", {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}, "already"),
        ("jax", {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, "several devices"),
    ],
)
def test_leaves_xla_flags_alone_when_told_or_not_jax(fresh_jax, backend, environ, reason):
    before = dict(environ)
    assert reason in xla_flags._reason_not_to_set(backend, environ)
    assert not xla_flags.configure(backend, environ, io.StringIO())
    assert environ == before


def test_not_set_with_an_accelerator_plugin_an_unverified_jaxlib_or_a_started_jax(
    fresh_jax, monkeypatch
):
    monkeypatch.setattr(xla_flags.importlib.util, "find_spec", lambda n: n == "libtpu")
    assert "plugin" in xla_flags._reason_not_to_set("jax", {})
    # JAX_PLATFORMS=cpu means the plugin will not be used: the flag helps again.
    assert xla_flags._reason_not_to_set("jax", {"JAX_PLATFORMS": "cpu"}) is None
    monkeypatch.setattr(xla_flags.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 4))
    assert "not one the flag was verified on" in xla_flags._reason_not_to_set("jax", {})
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: xla_flags.VERIFIED_JAXLIB[0])
    monkeypatch.setattr(xla_flags, "_jax_devices_created", lambda: True)
    assert "already created" in xla_flags._reason_not_to_set("jax", {})


def test_a_plain_import_on_cpu_jax_sets_the_flag_and_xla_accepts_it():
    # Runs on either suite: the child process uses JAX whatever this one uses.
    environ = {
        k: v for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", "KERAS_MINSNR_XLA_CPU_FLAGS", xla_flags.ADDED_VARIABLE)
    }
    environ.update(KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    code = (
        "import os, keras_minsnr, jax.numpy as jnp;"
        "print(float(jnp.ones(3).sum()));"
        "print(repr(os.environ.get('XLA_FLAGS', '')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == "3.0"
    version = xla_flags._jaxlib_version()
    low, high = xla_flags.VERIFIED_JAXLIB
    expected = xla_flags.FUSION_FLAG if version and low <= version < high else ""
    assert lines[-1] == repr(expected)
    assert result.stderr.count("added --xla_cpu_experimental_ynn_fusion_type") == int(bool(expected))


def test_backend_is_read_as_keras_would_without_importing_it(tmp_path):
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    read = xla_flags.backend_from_environment
    assert read({"KERAS_BACKEND": "jax", "KERAS_HOME": str(tmp_path / "none")}) == "jax"
    assert read({"KERAS_HOME": str(tmp_path)}) == "jax"
    assert read({"KERAS_BACKEND": "tensorflow", "KERAS_HOME": str(tmp_path)}) == "tensorflow"
    assert read({"KERAS_HOME": str(tmp_path / "none")}) == "tensorflow"
