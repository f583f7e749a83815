"""Small helpers the benchmarks share: process memory, the device, child processes."""

import json
import os
import platform
import subprocess
import sys


def rss_mb(field):
    """A memory field of this process from /proc (``VmRSS``, ``VmHWM`` = peak), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def gpu_name(backend):
    """The first GPU's name as the backend sees it, or None on CPU."""
    try:
        if backend == "jax":
            import jax

            device = jax.devices()[0]
            return device.device_kind if device.platform == "gpu" else None
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
    except Exception:  # noqa: BLE001 - a missing GPU stack means CPU
        return None
    return None


def device_peak_mb(backend):
    """The device allocator's peak in MiB where the backend reports one (GPU), else None."""
    try:
        if backend == "jax":
            import jax

            stats = jax.devices()[0].memory_stats()
            if stats and "peak_bytes_in_use" in stats:
                return stats["peak_bytes_in_use"] / 2**20
        else:
            import tensorflow as tf

            if tf.config.list_physical_devices("GPU"):
                return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    except Exception:  # noqa: BLE001 - not every device reports allocator statistics
        return None
    return None


def device_description(backend):
    """The GPU's name, or the CPU model and core count with the load average right now
    (CPU figures are only comparable between runs at a similar load)."""
    gpu = gpu_name(backend)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if gpu:
        return gpu
    return f"CPU: {cpu}, {os.cpu_count()} cores (1-min load {os.getloadavg()[0]:.1f} at report time)"


def run_child(script, backend, arguments, cwd, env=None):
    """Runs ``script ARGUMENTS`` on ``backend`` in a fresh process (``env``: variables to
    add); returns the JSON object of its last ``RESULT {...}`` line (one backend per
    process: Keras fixes it at import)."""
    command = [sys.executable, os.path.abspath(script), *arguments]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=cwd)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"{backend} {' '.join(arguments)} failed (exit {done.returncode}).")
    return json.loads(lines[-1][len("RESULT "):])


def write_report(path, report):
    """Writes a benchmark's JSON report (making its folder) and says where."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
