"""The experiment grid as plain data: which jobs a sweep runs, their names and the grid's fingerprint.

Pure functions (no Hydra state), so the expansion rule is unit-tested on its own:

- ``fixed`` does not depend on the target KL (docs/sweeps.md): one job per seed × β in ``fixed_betas``
  (or one per seed at the configured β₀), never one per target;
- every other controller: one job per target × seed;
- the whole grid is repeated for every combination of the user's own sweep overrides
  (``ppo.lr=1e-4,3e-4`` on the command line), whose values then appear in the job names;
- Hydra's own sweep syntax for the grid's keys is the grid (:func:`grid_from_overrides`):
  ``controller=fixed,pid controller.target_kl=0.05,0.1 seed=0,1`` is ``sweep.controllers=[fixed,pid]
  sweep.targets=[0.05,0.1] sweep.seeds=[0,1]``, and ``controller.init_kl_coef=0.1,1`` is ``fixed``'s βs.
"""

# (no `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules,
# where dataclasses cannot resolve string annotations)

import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

# Keys the grid sets itself: a plain override of one of them would silently collapse the grid. The command
# line's values of those in GRID_OVERRIDES become the grid (grid_from_overrides); controller.name never can.
GRID_KEYS = ("controller", "controller.name", "controller.target_kl", "controller.init_kl_coef", "seed")
# grid key on the command line -> the sweep.* list it stands for
GRID_OVERRIDES = {
    "controller": "controllers",
    "controller.target_kl": "targets",
    "seed": "seeds",
    "controller.init_kl_coef": "fixed_betas",
}


@dataclass(frozen=True)
class Grid:
    """What :func:`expand_grid` crosses: the ``sweep.*`` lists, and one β₀ for the adaptive controllers."""

    controllers: tuple[str, ...]
    targets: tuple[float, ...]
    seeds: tuple[int, ...]
    fixed_betas: tuple[float, ...] | None = None
    beta0: float | None = None  # controller.init_kl_coef of every controller but `fixed` (None: its YAML's)

    @classmethod
    def of(cls, controllers: Any, targets: Any, seeds: Any, fixed_betas: Any = None) -> "Grid":
        """From the sweeper's parameters (lists or ListConfigs)."""
        return cls(
            controllers=tuple(str(c) for c in controllers),
            targets=tuple(float(t) for t in targets),
            seeds=tuple(int(s) for s in seeds),
            fixed_betas=tuple(float(b) for b in fixed_betas) if fixed_betas else None,
        )


def grid_from_overrides(
    grid: Grid, given: dict[str, list[str]], sweep_keys: Sequence[str] = ()
) -> tuple[Grid, list[str]]:
    """The grid after the command line's own overrides of the grid keys (``given``: key -> its values, one
    for ``seed=3``, several for ``seed=0,1,2``), and the ``sweep.*`` overrides that record it in every job's
    config. ``sweep_keys``: the ``sweep.*`` keys also on the command line (one list given twice is refused).

    ``controller.init_kl_coef`` is ``fixed``'s β (one job per β and seed). With other controllers in the grid it
    may be a single value, their shared β₀; several values would also sweep their β₀: run those as two sweeps."""
    changes: dict[str, Any] = {}
    for key, values in given.items():
        field_ = GRID_OVERRIDES[key]
        if f"sweep.{field_}" in sweep_keys:
            raise ValueError(f"{key}=... and sweep.{field_}=... both set the grid's {field_}: give one of them")
        if len(set(values)) != len(values):
            raise ValueError(f"{key}={','.join(values)} has duplicates")
        try:
            if field_ == "controllers":
                changes[field_] = tuple(values)
            elif field_ == "seeds":
                changes[field_] = tuple(int(v) for v in values)
            else:
                changes[field_] = tuple(float(v) for v in values)
        except ValueError:
            kind = "an integer" if field_ == "seeds" else "a number"
            raise ValueError(f"{key}={','.join(values)}: each value must be {kind}") from None
    betas = changes.pop("fixed_betas", None)
    grid = replace(grid, **changes)
    if "targets" in changes and set(grid.controllers) == {"fixed"}:
        raise ValueError("controller.target_kl is not used by `fixed` (its β is fixed): sweep controller.init_kl_coef")
    if betas is not None:
        others = [c for c in grid.controllers if c != "fixed"]
        if others and len(betas) > 1:
            raise ValueError(
                f"controller.init_kl_coef={','.join(map(_num, betas))} sweeps fixed's β, and would also sweep the "
                f"β₀ of {', '.join(others)}: run `fixed` with these βs as its own sweep (controller=fixed), "
                "or give one β₀"
            )
        grid = replace(
            grid,
            fixed_betas=betas if "fixed" in grid.controllers else grid.fixed_betas,
            beta0=betas[0] if others else None,
        )
    recorded = []  # the grid as it ran, in every job's `sweep:` section
    for key in given:
        field_ = GRID_OVERRIDES[key]
        value = getattr(grid, field_)
        if field_ == "fixed_betas" and value is None:
            continue
        recorded.append(f"sweep.{field_}=[{','.join(v if isinstance(v, str) else _num(v) for v in value)}]")
    return grid, recorded


def is_grid_override(o: Any) -> bool:
    """Whether a parsed override sets one of the grid's keys (``seed=0,1``, ``controller=pid``)."""
    return o.key_or_group in GRID_OVERRIDES and o.package is None and not o.is_delete()


def grid_values(o: Any) -> list[str]:
    """The values of a parsed override, as strings: one for ``seed=3``, every one for ``seed=0,1`` or
    ``seed=range(0,5)``."""
    if not o.is_sweep_override():
        return [o.get_value_element_as_str()]
    if not o.is_discrete_sweep():
        raise ValueError(f"{o.input_line}: only discrete sweeps (a,b,c; range; choice) make a grid")
    return [str(v) for v in o.sweep_string_iterator()]


def combinations(overrides: Sequence[Any]) -> list[list[str]]:
    """Every combination of parsed Hydra overrides (hydra.core.override_parser.types.Override), as the
    lists of ``key=value`` strings one job gets: ``a=1,2 b=3`` -> [[a=1, b=3], [a=2, b=3]]. Discrete sweeps
    only (lists, ``range``, ``choice``); an interval has no finite grid."""
    lists = [
        [f"{o.get_key_element()}={v}" for v in grid_values(o)] if o.is_sweep_override() else [o.input_line]
        for o in overrides
    ]
    return [list(c) for c in itertools.product(*lists)]


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
    beta0: float | None = None,
) -> list[Job]:
    """All jobs of the grid, in a stable order. ``combos``: the user's overrides, one list per
    combination of their sweep values; ``swept_keys``: the keys that vary across combos (named in job
    names); ``beta0``: the init_kl_coef of every controller but ``fixed`` (None: the controller's own)."""
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
                raise ValueError(
                    f"override {o!r} sets a key the grid sets; choose the grid with controller=..., "
                    "controller.target_kl=..., seed=... (comma-separated) or sweep.controllers/targets/seeds"
                )
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
                        if beta0 is not None:
                            ov.insert(1, f"controller.init_kl_coef={_num(beta0)}")
                        name = f"{c}_kl{_num(t)}_s{s}{suffix}"
                        jobs.append(Job(name, (*combo, *ov), c, float(t), None, int(s), tuple(combo)))
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"two jobs would share a run dir: {sorted(n for n in names if names.count(n) > 1)}")
    return jobs


def jobs_of(grid: Grid, overrides: Sequence[Any], argument_keys: Sequence[str] = ()) -> list[Job]:
    """Every job of ``grid`` with the command line's parsed overrides (hydra.core.override_parser.types.Override):
    those of the grid's keys change the grid (:func:`grid_from_overrides`), the others are crossed with it.
    ``argument_keys``: the command line's keys (to refuse one list given two ways). Raises ValueError, naming the
    key, for what cannot be meant."""
    on_grid = [o for o in overrides if is_grid_override(o)]
    given = {o.key_or_group: grid_values(o) for o in on_grid}
    grid, recorded = grid_from_overrides(grid, given, argument_keys)
    rest = [o for o in overrides if o not in on_grid]
    swept = [o.get_key_element() for o in rest if o.is_sweep_override()]
    combos = [[*c, *recorded] for c in combinations(rest)]
    return expand_grid(grid.controllers, grid.targets, grid.seeds, grid.fixed_betas, combos, swept, beta0=grid.beta0)


def _is_sweep_key(override: str) -> bool:
    key = override.partition("=")[0].lstrip("+~")
    return key == "sweep" or key.startswith("sweep.")


def fingerprint(name: str, jobs: Sequence[Job]) -> str:
    """A hash of the sweep's name and every job's overrides, except those of the ``sweep`` section itself
    (``sweep.fresh``, ``sweep.root``, … change where and how the sweep runs, not what its jobs compute; the
    grid they select is in the jobs' own overrides): same name + same grid = same fingerprint."""
    payload = json.dumps([name, sorted([j.name, sorted(o for o in j.overrides if not _is_sweep_key(o))] for j in jobs)])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
