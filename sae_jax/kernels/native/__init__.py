"""Hand-written XLA:CPU kernels for the SAE's row gathers and scatters (`sparse_rows.cc`).

XLA:CPU runs gathers and scatters as scalar loops; on the benchmark configuration they and their
sort cost about two thirds of everything a training step does beyond the encoder matmul and
top-k (docs/benchmarks.md). These kernels do the same sums in vectorised row passes on XLA's
thread pool. `rows.py` and `topk.py` use them where the kernel plan says (CPU devices, when
`available()`: `kernel_plan.KernelPlan.native`) and keep their pure-XLA forms for GPU and TPU, and
for CPU hosts without them.

The source is compiled on first use with the host's C++ compiler (`$CXX`, else `c++`) against
the XLA FFI headers that ship with jaxlib, for this CPU (`-march=native`), and cached in
`$SAE_JAX_CACHE` (default `~/.cache/sae_jax`) under a key of the source, jaxlib's version and the
CPU's flags. Set `SAE_JAX_NATIVE=0` to turn them off. If the build fails, a warning says why and
the XLA forms are used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shlex
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging

SOURCE = pathlib.Path(__file__).with_name("sparse_rows.cc")
TARGETS = {  # FFI target name -> exported handler symbol
    "sae_gather_weighted_sum": "SaeGatherWeightedSum",
    "sae_row_grads": "SaeRowGrads",
    "sae_row_grads_and_dots": "SaeRowGradsAndDots",
    "sae_normalize_rows": "SaeNormalizeRows",
    "sae_row_dots": "SaeRowDots",
}


def _cpu_flags() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  return platform.processor()


def _compile_command(output: pathlib.Path) -> list[str]:
  return [*shlex.split(os.environ.get("CXX", "c++")), "-O3", "-march=native", "-std=c++17",
          "-fopenmp-simd", "-fPIC", "-shared", f"-I{jax.ffi.include_dir()}", str(SOURCE),
          "-o", str(output)]


def _build() -> pathlib.Path:
  """The compiled library, built into the cache unless an identical build is already there."""
  key = hashlib.sha256(b"\0".join([
      SOURCE.read_bytes(), jaxlib.__version__.encode(), _cpu_flags().encode(),
      " ".join(_compile_command(pathlib.Path("out"))).encode()])).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get("SAE_JAX_CACHE", pathlib.Path.home() / ".cache/sae_jax"))
  library = cache / f"sparse_rows-{key}.so"
  if not library.exists():
    logging.info("sae_jax.kernels.native: compiling the CPU kernels into %s (once)", library)
    cache.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: concurrent processes never load a partial file.
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
      partial = pathlib.Path(tmp) / library.name
      result = subprocess.run(_compile_command(partial), capture_output=True, text=True)
      if result.returncode:
        command = shlex.join(_compile_command(partial))
        raise RuntimeError(f"{command} failed:\n{result.stderr[-2000:]}")
      os.replace(partial, library)
  return library


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether the kernels are built and registered with XLA:CPU (once per process)."""
  if os.environ.get("SAE_JAX_NATIVE", "1") == "0":
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(_build()))
  except (OSError, RuntimeError) as error:
    logging.warning("sae_jax.kernels.native: CPU kernels unavailable, using the slower XLA "
                    "gathers and scatters (%s)", error)
    return False
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  return True


def gather_weighted_sum(weights: jax.Array, indices: jax.Array, table: jax.Array) -> jax.Array:
  """out[b] = sum_j weights[b, j] * table[indices[b, j]], [B, d] float32; table float32 or
  bfloat16."""
  out = jax.ShapeDtypeStruct((weights.shape[0], table.shape[1]), jnp.float32)
  return jax.ffi.ffi_call("sae_gather_weighted_sum", out)(
      weights.astype(jnp.float32), indices.astype(jnp.int32), table)


def row_grads(indices: jax.Array, weights: jax.Array, rows: jax.Array, num_rows: int,
              sum_table: jax.Array | None = None):
  """(grad [n, d], sums [n], table_sum [d] or None): grad[i] = sum of weights[b, j] * rows[b]
  over the picks with indices[b, j] == i, sums[i] the sum of those weights, and with a float32
  sum_table [n, d], table_sum = sums @ sum_table."""
  d = rows.shape[1]
  outs = (jax.ShapeDtypeStruct((num_rows, d), jnp.float32),
          jax.ShapeDtypeStruct((num_rows,), jnp.float32), jax.ShapeDtypeStruct((d,), jnp.float32))
  table = jnp.zeros((0, d), jnp.float32) if sum_table is None else sum_table.astype(jnp.float32)
  grad, sums, table_sum = jax.ffi.ffi_call("sae_row_grads", outs)(
      indices.astype(jnp.int32), weights.astype(jnp.float32), rows.astype(jnp.float32), table)
  return grad, sums, None if sum_table is None else table_sum


def row_grads_and_dots(indices: jax.Array, weights: jax.Array, rows: jax.Array,
                       table: jax.Array):
  """`row_grads` into a matrix shaped like `table`, and dots [B, K] = rows[b] . table[indices[b, j]]
  (the decoder's backward: its weight gradient and its value gradient in one pass)."""
  batch, picks = indices.shape
  outs = (jax.ShapeDtypeStruct((table.shape[0], rows.shape[1]), jnp.float32),
          jax.ShapeDtypeStruct((table.shape[0],), jnp.float32),
          jax.ShapeDtypeStruct((batch, picks), jnp.float32))
  return jax.ffi.ffi_call("sae_row_grads_and_dots", outs)(
      indices.astype(jnp.int32), weights.astype(jnp.float32), rows.astype(jnp.float32), table)


def normalize_rows(w: jax.Array, eps: float) -> jax.Array:
  """w[i] / max(|w[i]|, eps) for each row of a float32 [n, d] matrix."""
  return jax.ffi.ffi_call("sae_normalize_rows", jax.ShapeDtypeStruct(w.shape, jnp.float32),
                          input_output_aliases={0: 0})(w.astype(jnp.float32), eps=np.float32(eps))


def row_dots(a: jax.Array, b: jax.Array) -> jax.Array:
  """a[i] . b[i] for each row of two float32 [n, d] matrices, [n]."""
  return jax.ffi.ffi_call("sae_row_dots", jax.ShapeDtypeStruct(a.shape[:1], jnp.float32))(
      a.astype(jnp.float32), b.astype(jnp.float32))
