"""The experiment grid as plain data: which jobs a sweep runs, their names and the grid's fingerprint.

Pure functions (no Hydra state), so the expansion rule is unit-tested on its own:

- ``fixed`` does not depend on the target KL (RESEARCH.md §5): one job per seed × β in ``fixed_betas``
  (or one per seed at the configured β₀), never one per target;
- every other controller: one job per target × seed;
- the whole grid is repeated for every combination of the user's own sweep overrides
  (``ppo.lr=1e-4,3e-4`` on the command line), whose values then appear in the job names.
"""

# (no `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules,
# where dataclasses cannot resolve string annotations)

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

# Keys the grid sets itself: overriding them on the command line would silently collapse the grid.
GRID_KEYS = ("controller", "controller.name", "controller.target_kl", "controller.init_kl_coef", "seed")


@dataclass(frozen=True)
class Job:
    """One run of the grid: its directory name inside the sweep dir and its Hydra overrides."""

    name: str
    overrides: tuple[str, ...]
    controller: str
    target_kl: float | None  # None for `fixed`
    init_kl_coef: float | None  # None: the controller config's default
    seed: int
    extra: tuple[str, ...] = field(default=())  # the user's overrides for this combination


def _num(x: float) -> str:
    """0.05 -> '0.05', 0.1 -> '0.1', 1e-05 -> '1e-05': short, stable, a valid Hydra float literal."""
    return f"{float(x):g}"


def _slug(override: str) -> str:
    key, _, value = override.partition("=")
    key = key.lstrip("+~").split(".")[-1]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", f"{key}={value}")


def expand_grid(
    controllers: Sequence[str],
    targets: Sequence[float],
    seeds: Sequence[int],
    fixed_betas: Sequence[float] | None = None,
    combos: Sequence[Sequence[str]] = ((),),
    swept_keys: Sequence[str] = (),
) -> list[Job]:
    """All jobs of the grid, in a stable order. ``combos``: the user's overrides, one list per
    combination of their sweep values; ``swept_keys``: the keys that vary across combos (named in job
    names)."""
    if not controllers or not seeds:
        raise ValueError("sweep.controllers and sweep.seeds must not be empty")
    if any(c != "fixed" for c in controllers) and not targets:
        raise ValueError("sweep.targets must not be empty when a controller other than `fixed` is swept")
    for dup, what in ((controllers, "controllers"), (targets, "targets"), (seeds, "seeds")):
        if len(set(dup)) != len(dup):
            raise ValueError(f"sweep.{what} has duplicates: {list(dup)}")
    for combo in combos:
        for o in combo:
            if o.partition("=")[0].lstrip("+~") in GRID_KEYS:
                raise ValueError(f"override {o!r} sets a key the grid sets; use sweep.controllers/targets/seeds")
    jobs: list[Job] = []
    for combo in combos:
        suffix = "".join("_" + _slug(o) for o in combo if o.partition("=")[0] in swept_keys)
        for c in controllers:
            if c == "fixed":
                for beta in fixed_betas if fixed_betas else [None]:
                    for s in seeds:
                        ov = ["controller=fixed"]
                        if beta is not None:
                            ov.append(f"controller.init_kl_coef={_num(beta)}")
                        ov.append(f"seed={int(s)}")
                        name = f"fixed_b{_num(beta)}_s{s}" if beta is not None else f"fixed_s{s}"
                        jobs.append(Job(name + suffix, (*combo, *ov), c, None, beta, int(s), tuple(combo)))
            else:
                for t in targets:
                    for s in seeds:
                        ov = [f"controller={c}", f"controller.target_kl={_num(t)}", f"seed={int(s)}"]
                        name = f"{c}_kl{_num(t)}_s{s}{suffix}"
                        jobs.append(Job(name, (*combo, *ov), c, float(t), None, int(s), tuple(combo)))
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"two jobs would share a run dir: {sorted(n for n in names if names.count(n) > 1)}")
    return jobs


def _is_sweep_key(override: str) -> bool:
    key = override.partition("=")[0].lstrip("+~")
    return key == "sweep" or key.startswith("sweep.")


def fingerprint(name: str, jobs: Sequence[Job]) -> str:
    """A hash of the sweep's name and every job's overrides, except those of the ``sweep`` section itself
    (``sweep.fresh``, ``sweep.root``, … change where and how the sweep runs, not what its jobs compute; the
    grid they select is in the jobs' own overrides): same name + same grid = same fingerprint."""
    payload = json.dumps([name, sorted([j.name, sorted(o for o in j.overrides if not _is_sweep_key(o))] for j in jobs)])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
