"""The members of a sweep: several SAEs that `sae_jax.train` trains on one pass over the data.

A spec is a set of per-SAE flag overrides on top of the command line, written as on a command line
(`--k=16 --lr=1e-3`, `--multi_topk`, `--nonormalize_inputs`), from a repeated `--sae` or one
non-blank, non-# line of a `--sweep` file. `--name=X` names the member; otherwise its flags do
(`--k=16 --lr=1e-3` -> `k16_lr1e-3`). Member NAME trains in WORKDIR/NAME, a workdir like a single
run's; WORKDIR/sweep.json lists the members (their workdirs relative to it), and a resumed sweep must
list the same ones.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import NamedTuple, Sequence

from absl import flags

from sae_jax.store import absolute
from sae_jax.files import atomic_write_json

SWEEP_FILE = "sweep.json"
PATH_FLAGS = ("store", "init_from")  # recorded absolute; a member's default name takes the basename
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]*")


class SweepError(ValueError):
  """A spec that cannot be a member, or a sweep that a workdir cannot resume."""


class Member(NamedTuple):
  name: str
  overrides: dict  # flag name -> value as the flag holds it (paths absolute)


def read_specs(sae_specs: Sequence[str], sweep_file: str | None, allowed: Sequence[str],
               flag_values: flags.FlagValues) -> list[Member]:
  """The members of `--sae` specs then `--sweep` lines, in that order; none without either."""
  sources = [(f"--sae={shlex.quote(text)}", text) for text in sae_specs]
  if sweep_file:
    try:
      lines = Path(sweep_file).read_text().splitlines()
    except OSError as e:
      raise SweepError(f"--sweep={sweep_file}: {e.strerror}") from e
    sources += [(f"--sweep={sweep_file} line {i}", line) for i, line in enumerate(lines, 1)
                if line.strip() and not line.lstrip().startswith("#")]
    if len(sources) == len(sae_specs):
      raise SweepError(f"--sweep={sweep_file} has no specs (one per non-blank, non-# line)")
  members = [parse_spec(text, where, allowed, flag_values) for where, text in sources]
  seen = {}
  for member, (where, _) in zip(members, sources):
    if member.name in seen:
      raise SweepError(f"{where} and {seen[member.name]} both name a member {member.name!r}; "
                       "give one of them another --name=")
    seen[member.name] = where
  return members


def parse_spec(text: str, where: str, allowed: Sequence[str],
               flag_values: flags.FlagValues) -> Member:
  """One spec's member; `where` (the spec as the command line gave it) starts every error."""
  try:
    tokens = shlex.split(text, comments=True)
  except ValueError as e:
    raise SweepError(f"{where}: {e}") from e
  name, overrides, words = None, {}, []
  for token in tokens:
    flag, eq, value = token[2:].partition("=")
    if not token.startswith("--") or not flag:
      raise SweepError(f"{where}: {token!r} is not a --flag=value")
    if flag == "name":
      if not _NAME.fullmatch(value):
        raise SweepError(f"{where}: --name={value!r} is not a folder name (letters, digits, ._=+-)")
      name = value
      continue
    if not eq and flag.startswith("no") and flag[2:] in flag_values and (
        flag_values[flag[2:]].boolean):
      flag, value = flag[2:], "false"
    if flag not in flag_values:
      raise SweepError(f"{where}: unknown flag --{flag}")
    if flag not in allowed:
      raise SweepError(f"{where}: --{flag} is the same for every member of a sweep (a spec may "
                       f"set only {', '.join('--' + f for f in allowed)})")
    if not eq and flag_values[flag].boolean:
      value = "true"
    elif not eq:
      raise SweepError(f"{where}: --{flag} needs a value (--{flag}=...)")
    if flag in overrides:
      raise SweepError(f"{where}: --{flag} is given twice")
    try:
      overrides[flag] = flag_values[flag].parser.parse(value)
    except ValueError as e:
      raise SweepError(f"{where}: --{flag}={value}: {e}") from e
    if flag in PATH_FLAGS:
      overrides[flag] = absolute(value)
    words.append(token[2:].replace("=", "", 1) if flag not in PATH_FLAGS else
                 f"{flag}_{Path(value.rstrip('/')).name}")
  name = name or re.sub(r"[^A-Za-z0-9._=+-]", "_", "_".join(words)) or "default"
  return Member(name, overrides)


def record(members: Sequence[Member]) -> dict:
  # Workdirs relative to the sweep folder, so that a copy of the folder is read where it is.
  return {"members": [{"name": m.name, "workdir": m.name, "overrides": m.overrides}
                      for m in members]}


def check_resumed(workdir: Path, members: Sequence[Member]) -> None:
  """Refuses to resume a sweep in `workdir` with other members than it was started with."""
  path = workdir / SWEEP_FILE
  if not path.exists():
    return
  old = {m["name"]: m["overrides"] for m in json.loads(path.read_text())["members"]}
  new = {m.name: json.loads(json.dumps(m.overrides)) for m in members}
  if old == new:
    return
  added, dropped = sorted(new.keys() - old.keys()), sorted(old.keys() - new.keys())
  changed = [f"{n} had {old[n]}, now {new[n]}" for n in sorted(old.keys() & new.keys())
             if old[n] != new[n]]
  differences = ([f"adds {', '.join(added)}"] * bool(added) +
                 [f"drops {', '.join(dropped)}"] * bool(dropped) + changed)
  raise SweepError(f"the sweep in {workdir} has other members: this one {'; '.join(differences)}; "
                   "rerun with the same --sae/--sweep specs to resume it, or use a new --workdir")


def write(workdir: Path, members: Sequence[Member]) -> None:
  atomic_write_json(workdir / SWEEP_FILE, record(members))
