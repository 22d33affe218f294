"""The sparse kernels with the latent axis split over the mesh axis "model" (`jax.shard_map`).

Left to XLA, a top-k over a sharded latent axis all-gathers the whole [batch, n] pre-activation
matrix. Here every shard instead runs topk.py's kernels on its own n/m latents:

  select: local dense pre-activations and local top-k (topk.sparse_encoder, so the backward stays
          a sparse scatter into this shard's rows); all-gather of the k candidates (values and
          global indices) over "model"; global top-k of the m*k candidates, the same on every shard.
          A selection that needs no per-token order across shards (BatchTopK's cut over the
          batch, `merge_shards=False`) keeps each shard's own candidates where they are.
  decode: each shard decodes the winners it owns (the others masked to weight 0, indices made
          shard-local) with topk.sparse_decode; the partial sums are psum'd over "model".

  AuxK:   by default each shard keeps its own top dead latents, k_aux in all (k_aux // m each,
          one more on the first k_aux % m shards), and decodes them where they are
          (`auxk_select`): no candidates move.

Forward, per merged selection (top-k or 4k; AuxK only with auxk_select="exact") one all-gather
of [B/d, m*k] values and indices over "model", and per decode one psum of [B/d, d_in]; the backward
runs their transposes (a reduce-scatter of the candidates' cotangent, a psum of the decode's).
Nothing of size [B, n] moves.
The functions take the same arguments as their topk.py counterparts and must run under a mesh with
a "model" axis (`jax.set_mesh`).

Gradients: autodiff through shard_map with check_vma=False, which is exact here. Every output but
the per-shard AuxK picks (split over "model", their cotangents stay on their shard) is
replicated over "model" (the global selection is computed identically on every shard, the decode
is psum'd). For such outputs shard_map's transpose divides the incoming cotangent by the size of
the mesh axes the out_spec does not name, and psums each input's cotangent over the axes its
in_spec does not name (jax/_src/shard_map.py, _shard_map_transpose). So the transpose of the
candidates' all-gather, a reduce-scatter that sums the m shards' copies of the replicated
cotangent, sums m copies of cotangent/m: no factor m. The same rule adds the "data" reduction of
the weight gradients. check_vma=True would make those two backward collectives free (an
`all_gather(..., to="invarying")` transposes to a local slice, a psum to nothing), but topk.py's
cond and custom_vjp would then need varying-manual-axis annotations; the collectives are
O(B k + B d), small next to the O(B n d / m) encoder matmul. tests/test_sharded.py compares
gradients and several train steps on 8x1, 4x2, 2x4 and 1x8 meshes with one device.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sae_jax.kernels import rows
from sae_jax.kernels import topk as topk_lib
from sae_jax.kernels.kernel_plan import KernelPlan

AXIS = "model"


def active() -> bool:
  """Whether the kernels must run per shard: on any mesh of more than one device. A data-only mesh
  needs it too: for a top_k over a batch-split [B, n], XLA's partitioner all-gathers the whole
  matrix over "data" (seen in the compiled HLO of jax 0.10.2 on CPU)."""
  mesh = jax.sharding.get_abstract_mesh()
  return AXIS in mesh.axis_names and mesh.size > 1


def _batch_spec() -> P:
  # The batch stays split over "data" as the trainer lays it out (replicated on a mesh without it).
  return P("data" if "data" in jax.sharding.get_abstract_mesh().axis_names else None, None)


def _global_top(values: jax.Array, indices: jax.Array, k: int):
  """The k largest of all shards' candidates, (values, global indices), replicated over "model".

  Shards are concatenated in order and each shard's candidates are sorted with ties to the lower
  index, so ties go to the lower global index, as one top_k over all latents does."""
  candidate_values = jax.lax.all_gather(values, AXIS, axis=1, tiled=True)
  candidate_indices = jax.lax.all_gather(indices, AXIS, axis=1, tiled=True)
  top_values, positions = jax.lax.top_k(candidate_values, k)
  return top_values, jnp.take_along_axis(candidate_indices, positions, axis=1)


AUXK_SELECTS = ("per_shard", "exact")


@functools.lru_cache(maxsize=None)
def sparse_encoder(plan: KernelPlan, k: int, k_aux: int, method: str = "exact",
                   recall: float = 0.95, compute_dtype: str = "float32",
                   weight_grads: str = "auto", capacity: float = 0.0,
                   auxk_select: str = "per_shard", merge_shards: bool = True):
  """topk.sparse_encoder over latent shards: f(x, b_dec, W_enc, b_enc, dead) -> (values [B,k],
  indices [B,k], aux_values, aux_indices), indices global. `capacity`: see
  SAEConfig.shard_capacity (0: exact).

  `merge_shards=False`: no global top-k; each shard's own k candidates (as many as `capacity`
  lets it offer, each block sorted) stay on it, [B, m * per-shard count] split over "model" along
  the pick axis (decoded with `picks_per_shard=True`). Nothing is gathered.

  AuxK (`auxk_select`): "exact" gathers every shard's top-k_aux dead candidates and selects the
  global top k_aux ([B, k_aux] outputs, replicated over "model"). "per_shard" keeps each shard's
  own top dead latents, nothing gathered, k_aux in all: shard s takes k_aux // m, plus one when
  s < k_aux % m. The outputs are [B, m * ceil(k_aux / m)] split over "model" along the pick axis,
  shard s's block holding its own picks (a shard's surplus slot is value 0, inert), which
  `decode_with_aux(..., auxk_select="per_shard")` decodes where they are."""

  def candidates(count: int, num_local: int) -> int:
    # A shard holds at most its own latents; m shards still offer min(m*k, n) >= k candidates.
    budget = min(count, num_local)
    if capacity:
      budget = min(budget, math.ceil(capacity * count / jax.lax.axis_size(AXIS)))
    return budget

  def aux_budget(num_local: int) -> int:
    if auxk_select == "exact":
      return candidates(k_aux, num_local)
    return min(math.ceil(k_aux / jax.lax.axis_size(AXIS)), num_local)

  def local(x, b_dec, W_enc, b_enc, dead):
    num_local = W_enc.shape[0]
    offset = jax.lax.axis_index(AXIS) * num_local
    encode = topk_lib.sparse_encoder(plan, candidates(k, num_local), aux_budget(num_local),
                                     method, recall, compute_dtype, weight_grads)
    values, indices, aux_values, aux_indices = encode(x, b_dec, W_enc, b_enc, dead)
    indices = indices + offset
    if merge_shards:
      values, indices = _global_top(values, indices, k)
    aux_indices = aux_indices + offset
    if k_aux and auxk_select == "exact":
      # Masked picks (live latents, or shards with nothing dead) are value 0 and stay inert.
      aux_values, aux_indices = _global_top(aux_values, aux_indices, k_aux)
    elif k_aux:
      # Blocks are equal-sized (ceil(k_aux / m)); zeroing the surplus keeps exactly k_aux picks.
      shards, shard = jax.lax.axis_size(AXIS), jax.lax.axis_index(AXIS)
      keep = k_aux // shards + (shard < k_aux % shards)
      aux_values = jnp.where(jnp.arange(aux_values.shape[1]) < keep, aux_values, 0.0)
    return values, indices, aux_values, aux_indices

  def encode(x, b_dec, W_enc, b_enc, dead):
    batch = _batch_spec()
    aux = _aux_spec(auxk_select)
    picks = batch if merge_shards else _per_shard_spec()
    return jax.shard_map(local, in_specs=(batch, P(), P(AXIS, None), P(AXIS), P(AXIS)),
                         out_specs=(picks, picks, aux, aux), check_vma=False)(
                             x, b_dec, W_enc, b_enc, dead)

  if auxk_select not in AUXK_SELECTS:
    raise ValueError(f"auxk_select={auxk_select!r}; expected one of {AUXK_SELECTS}")
  return encode


def _per_shard_spec() -> P:
  """Picks that stay on the shard of their latents: split over "model" along the pick axis."""
  return P(_batch_spec()[0], AXIS)


def _aux_spec(auxk_select: str) -> P:
  """Where AuxK's picks live: replicated over "model" (exact), or each shard's own (per_shard)."""
  return _per_shard_spec() if auxk_select == "per_shard" else _batch_spec()


def shard_count() -> int:
  """The number of latent shards ("model"'s size; 1 without sharded kernels)."""
  return jax.sharding.get_abstract_mesh().shape[AXIS] if active() else 1


def _local_picks(values: jax.Array, indices: jax.Array, num_local: int):
  """(values, indices) of the picks in this shard's rows, with shard-local indices; picks of
  other shards become index 0 with value 0."""
  indices = indices - jax.lax.axis_index(AXIS) * num_local
  mine = (indices >= 0) & (indices < num_local)
  return jnp.where(mine, values, 0.0), jnp.where(mine, indices, 0)


def sparse_decode(plan: KernelPlan, values: jax.Array, indices: jax.Array, W_dec: jax.Array,
                  weight_grads: str = "auto", compute_dtype: str = "float32",
                  picks_per_shard: bool = False) -> jax.Array:
  """topk.sparse_decode with W_dec [n, d] split over "model" and global indices [B, k]
  (`picks_per_shard`: as `sparse_encoder(..., merge_shards=False)` lays them out)."""

  def local(values, indices, W_dec):
    part = topk_lib.sparse_decode(plan, *_local_picks(values, indices, W_dec.shape[0]), W_dec,
                                  weight_grads, compute_dtype)
    return jax.lax.psum(part, AXIS)

  batch = _batch_spec()
  picks = _per_shard_spec() if picks_per_shard else batch
  return jax.shard_map(local, in_specs=(picks, picks, P(AXIS, None)), out_specs=batch,
                       check_vma=False)(values, indices, W_dec)


def decode_with_aux(plan: KernelPlan, values: jax.Array, indices: jax.Array,
                    aux_values: jax.Array, aux_indices: jax.Array, aux_on: jax.Array,
                    W_dec: jax.Array, weight_grads: str = "auto", compute_dtype: str = "float32",
                    auxk_select: str = "per_shard", picks_per_shard: bool = False):
  """topk.decode_with_aux with W_dec [n, d] split over "model", global indices, and the picks
  laid out as `sparse_encoder(..., auxk_select, merge_shards=not picks_per_shard)` returns them."""

  def local(values, indices, aux_values, aux_indices, aux_on, W_dec):
    num_local = W_dec.shape[0]
    parts = topk_lib.decode_with_aux(plan, *_local_picks(values, indices, num_local),
                                     *_local_picks(aux_values, aux_indices, num_local), aux_on,
                                     W_dec, weight_grads, compute_dtype)
    return jax.lax.psum(parts, AXIS)

  batch, aux = _batch_spec(), _aux_spec(auxk_select)
  picks = _per_shard_spec() if picks_per_shard else batch
  return jax.shard_map(local, in_specs=(picks, picks, aux, aux, P(), P(AXIS, None)),
                       out_specs=(batch, batch), check_vma=False)(
                           values, indices, aux_values, aux_indices, aux_on, W_dec)


def fired(indices: jax.Array, values: jax.Array, num_latents: int) -> jax.Array:
  """Which latents ([n] bool, split over "model") the picks of `sparse_encoder(...,
  merge_shards=False)` fire with a positive value: each shard marks its own, nothing gathered."""

  def local(indices, values):
    num_local = num_latents // jax.lax.axis_size(AXIS)
    values, indices = _local_picks(values, indices, num_local)
    hit = rows.fired(indices, values, num_local)
    data = _batch_spec()[0]  # the batch's rows on the other data shards fire latents too
    return jax.lax.pmax(hit.astype(jnp.int32), data) > 0 if data else hit

  picks = _per_shard_spec()
  return jax.shard_map(local, in_specs=(picks, picks), out_specs=P(AXIS), check_vma=False)(
      indices, values)


# Row-local ops of [n, d] matrices split over "model": per shard, without collectives. Outside
# shard_map, XLA would all-gather the matrices into the native CPU kernels (custom calls it
# cannot partition).
def row_dots(plan: KernelPlan, a: jax.Array, b: jax.Array) -> jax.Array:
  """rows.row_dots of two [n, d] matrices split over "model"."""
  spec = P(AXIS, None)
  return jax.shard_map(functools.partial(rows.row_dots, plan), in_specs=(spec, spec),
                       out_specs=P(AXIS), check_vma=False)(a, b)


def normalize_rows(plan: KernelPlan, w: jax.Array, eps: float = 1e-12) -> jax.Array:
  """rows.normalize_rows of an [n, d] matrix split over "model"."""
  spec = P(AXIS, None)
  return jax.shard_map(functools.partial(rows.normalize_rows, plan, eps=eps), in_specs=spec,
                       out_specs=spec, check_vma=False)(w)
