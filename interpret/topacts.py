"""The choice of latents to work on, and its flags (shared by explain, dashboard and clip_score).

TOPACTS itself (`sae_jax.scan`'s output) is defined and read in `sae_jax.formats.topacts`; its
reader and error are imported here for the code that selects from it.
"""

from __future__ import annotations

from sae_jax.formats.topacts import TopActs, TopActsError


def parse_latent_spec(spec: str) -> list[int]:
  """'1,5,10-20' -> [1, 5, 10, ..., 20] (ranges inclusive), in the order given, without repeats."""
  out: dict[int, None] = {}
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    lo, sep, hi = part.partition("-")
    try:
      first, last = int(lo), int(hi) if sep else int(lo)
    except ValueError:
      raise TopActsError(f"--latents: {part!r} is neither an integer nor a range like 10-20") from None
    if last < first:
      raise TopActsError(f"--latents: range {part!r} is empty")
    out.update(dict.fromkeys(range(first, last + 1)))
  return list(out)


def select_latents(topacts: TopActs, spec: str | None = None, min_density: float = 0.0,
                   max_density: float = 1.0, max_latents: int | None = None,
                   restrict_to: set[int] | None = None,
                   with_text: bool = False) -> tuple[list[int], int]:
  """The latents to work on and how many of them were dropped for having no top image (nor, with
  `with_text`, a top text row: text-only latents are kept then).

  `spec` ('1,5,10-20', None = all) is filtered by density (inclusive bounds), by `restrict_to`
  (e.g. the latents that have an explanation), then cut to the first `max_latents`.
  """
  if spec:
    chosen = parse_latent_spec(spec)
    bad = [i for i in chosen if not 0 <= i < len(topacts)]
    if bad:
      raise TopActsError(f"--latents names {bad[:5]} but {topacts.path} has latents "
                         f"0..{len(topacts) - 1}")
  else:
    chosen = range(len(topacts))
  density, has_images = topacts.density, topacts.has_images()
  if with_text:
    has_images = has_images | topacts.has_text_rows()
  chosen = [i for i in chosen if min_density <= density[i] <= max_density
            and (restrict_to is None or i in restrict_to)]
  with_images = [i for i in chosen if has_images[i]]
  skipped = len(chosen) - len(with_images)
  if max_latents is not None:
    with_images = with_images[:max_latents]
  return with_images, skipped


def define_selection_flags(flags) -> None:
  """The latent-selection flags shared by `interpret.explain` and `interpret.dashboard`."""
  flags.DEFINE_string("latents", None, "Latents to use, e.g. '1,5,10-20' (default: all).")
  flags.DEFINE_float("min_density", 0.0, "Skip latents that fire on a smaller fraction of tokens.")
  flags.DEFINE_float("max_density", 1.0, "Skip latents that fire on a larger fraction of tokens.")
  flags.DEFINE_integer("max_latents", None, "Use at most this many latents (after the filters).")


def selection_from_flags(topacts: TopActs, flag_values, restrict_to: set[int] | None = None,
                         with_text: bool = False):
  return select_latents(topacts, flag_values.latents, flag_values.min_density,
                        flag_values.max_density, flag_values.max_latents, restrict_to, with_text)
