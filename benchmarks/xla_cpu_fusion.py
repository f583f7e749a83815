"""Minimal reproducer: XLA:CPU duplicates backward work across residual blocks.

A stack of ``depth`` pre-LayerNorm residual MLP blocks in plain JAX (no Keras, no
keras_minsnr), width 384, 256 tokens x batch 8: the shape of a `dit_s_2` step without
attention. For each depth the gradient of a squared loss is compiled and

* the optimised HLO is inspected: the number of ``add`` instructions and the largest
  operand count of any fusion (a fusion that recomputes the residual chain of every later
  block has many operands);
* the step is timed (median of ``--repeats`` after one warm-up call).

Each setting of ``XLA_FLAGS`` runs in its own child process, since XLA reads the
variable once. Without the fix the add count and the largest fusion grow faster than
linearly with depth and so does the backward time; with
``--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce`` both stay linear.

Usage::

    python benchmarks/xla_cpu_fusion.py                      # depths 2 4 8 12
    python benchmarks/xla_cpu_fusion.py --depths 2 4 --repeats 3

Writes ``benchmarks/results/xla_cpu_fusion.json``.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _common import device_description  # noqa: E402
from _common import write_report  # noqa: E402

FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"
WIDTH, TOKENS, BATCH = 384, 256, 8


def child(depths, repeats):
    import jax
    import jax.numpy as jnp

    def layer_norm(x):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-6)

    def forward(params, x):
        for w1, w2 in params:
            x = x + jax.nn.gelu(layer_norm(x) @ w1) @ w2
        return x

    def loss(params, x):
        return jnp.mean(forward(params, x) ** 2)

    rows = []
    for depth in depths:
        keys = jax.random.split(jax.random.key(0), 2 * depth + 1)
        params = [
            (
                jax.random.normal(keys[2 * i], (WIDTH, 4 * WIDTH)) * 0.02,
                jax.random.normal(keys[2 * i + 1], (4 * WIDTH, WIDTH)) * 0.02,
            )
            for i in range(depth)
        ]
        x = jax.random.normal(keys[-1], (BATCH, TOKENS, WIDTH))
        step = jax.jit(jax.grad(loss))
        hlo = step.lower(params, x).compile().as_text()
        fusion_operands = [
            len(re.findall(r"%[\w.\-]+", m.group(1)))
            for m in re.finditer(r"= \S+ fusion\((.*?)\), kind=", hlo)
        ]
        jax.block_until_ready(step(params, x))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(step(params, x))
            times.append(time.perf_counter() - start)
        rows.append(
            {
                "depth": depth,
                "add_instructions": len(re.findall(r"= f32\[[^\]]*\]\S* add\(", hlo)),
                "largest_fusion_operands": max(fusion_operands, default=0),
                "grad_step_s": statistics.median(times),
            }
        )
    print(json.dumps({"device": device_description("jax"), "rows": rows}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 12])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "xla_cpu_fusion.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.depths, args.repeats)

    results = {"flag": FLAG, "width": WIDTH, "tokens": TOKENS, "batch": BATCH}
    for name, flags in (("default", ""), ("with_flag", FLAG)):
        environ = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        command = [sys.executable, __file__, "--child", "--repeats", str(args.repeats),
                   "--depths", *map(str, args.depths)]
        output = subprocess.run(command, env=environ, capture_output=True, text=True, check=True)
        results[name] = json.loads(output.stdout.strip().splitlines()[-1])
        print(name)
        for row in results[name]["rows"]:
            print(f"  depth {row['depth']:3d}: {row['add_instructions']:5d} adds, largest "
                  f"fusion {row['largest_fusion_operands']:4d} operands, "
                  f"{row['grad_step_s'] * 1e3:8.1f} ms")
    results["load_average"] = os.getloadavg()
    write_report(args.output, results)


if __name__ == "__main__":
    sys.exit(main())
