"""β controllers for the KL penalty (docs/kl-contract.md, "Controllers").

Every controller is updated exactly once per rollout with the rollout's batch KL (nats per response
token) and n_steps = number of sequences in the rollout. β is always a Python float. `state_dict()`
holds *all* the state needed to continue the identical β trajectory after a restart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"controller.{key}={value!r} is invalid; allowed: {allowed}")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_bounds(kl_coef_min: float, kl_coef_max: float, init_kl_coef: float | None = None) -> None:
    """The β bounds, and β₀ inside them when given (adaptive and pid start inside; exponential clamps β₀)."""
    _check(_finite(kl_coef_min) and kl_coef_min > 0, "kl_coef_min", kl_coef_min, "a finite float > 0")
    _check(
        _finite(kl_coef_max) and kl_coef_max >= kl_coef_min,
        "kl_coef_max",
        kl_coef_max,
        f"a finite float >= kl_coef_min ({kl_coef_min})",
    )
    if init_kl_coef is not None:
        _check(
            kl_coef_min <= init_kl_coef <= kl_coef_max,
            "init_kl_coef",
            init_kl_coef,
            f"within [kl_coef_min, kl_coef_max] = [{kl_coef_min}, {kl_coef_max}]",
        )


class KLController:
    """Base class: holds β and the target, validates the shared parameters."""

    name: ClassVar[str]

    def __init__(self, init_kl_coef: float, target_kl: float) -> None:
        _check(_finite(init_kl_coef) and init_kl_coef >= 0, "init_kl_coef", init_kl_coef, "a finite float >= 0")
        _check(_finite(target_kl) and target_kl > 0, "target_kl", target_kl, "a finite float > 0 (nats/token)")
        self.init_kl_coef = float(init_kl_coef)
        self.target_kl = float(target_kl)
        self.beta = float(init_kl_coef)
        self.n_updates = 0

    @property
    def value(self) -> float:
        return float(self.beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Feed one rollout's batch KL (per token) and its number of sequences; return the new β."""
        if not _finite(current_kl):
            raise ValueError(f"{self.name} controller got a non-finite KL: {current_kl!r}")
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps <= 0:
            raise ValueError(f"{self.name} controller: n_steps must be a positive int, got {n_steps!r}")
        self.beta = float(self._step(float(current_kl), n_steps))
        self.n_updates += 1
        return self.beta

    def _step(self, kl: float, n_steps: int) -> float:
        raise NotImplementedError

    def relative_error(self, kl: float) -> float:
        return kl / self.target_kl - 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{k: v for k, v in vars(self).items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state_dict is for controller {state.get('name')!r}, not {self.name!r}")
        missing = set(vars(self)) - set(state)
        if missing:
            raise ValueError(f"{self.name} controller state_dict lacks keys {sorted(missing)}")
        for k in vars(self):
            setattr(self, k, state[k])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta:.6g}, target_kl={self.target_kl})"


class FixedController(KLController):
    """β = β₀ for ever. The static baseline; `target_kl` is kept only for logging and diagnostics."""

    name = "fixed"

    def _step(self, kl: float, n_steps: int) -> float:
        return self.beta


class AdaptiveController(KLController):
    """Ziegler et al. (2019): e = clip(KL/target − 1, ±error_clip); β ← clamp(β·(1 + e·n_steps/horizon), bounds).

    Integral-only action on log β (to first order). `horizon` is in samples: β can change by at most
    error_clip·n_steps/horizon per rollout, so horizon must be sized to the run's length. error_clip = 0.2 is
    Ziegler's; the bounds (absent in the anchors) are the ones `pid` uses, so that the two differ only in pid's
    P (and D) term. β stays positive only if horizon > error_clip·n_steps (config.validate checks it).
    """

    name = "adaptive"

    def __init__(
        self,
        init_kl_coef: float,
        target_kl: float,
        horizon: float,
        error_clip: float = 0.2,
        kl_coef_min: float = 1e-4,
        kl_coef_max: float = 10.0,
    ) -> None:
        super().__init__(init_kl_coef, target_kl)
        _check(_finite(horizon) and horizon > 0, "horizon", horizon, "a finite number of samples > 0")
        _check(_finite(error_clip) and 0 < error_clip < 1, "error_clip", error_clip, "a float in (0, 1)")
        _check_bounds(kl_coef_min, kl_coef_max, init_kl_coef)
        self.horizon = float(horizon)
        self.error_clip = float(error_clip)
        self.kl_coef_min = float(kl_coef_min)
        self.kl_coef_max = float(kl_coef_max)

    def _step(self, kl: float, n_steps: int) -> float:
        e = min(max(self.relative_error(kl), -self.error_clip), self.error_clip)
        factor = 1.0 + e * n_steps / self.horizon
        if factor <= 0:
            raise ValueError(
                f"adaptive controller: horizon={self.horizon:g} with n_steps={n_steps} makes β non-positive; "
                f"allowed: horizon > error_clip × n_steps = {self.error_clip * n_steps:g}"
            )
        return min(max(self.beta * factor, self.kl_coef_min), self.kl_coef_max)


class ExponentialController(KLController):
    """The seed's rule, with its crashes fixed: β ← clamp(β·exp(gain·err), kl_coef_min, kl_coef_max).

    err = KL − target (absolute, nats/token: the seed's choice, whose effective gain depends on the KL's
    scale: at a 0.05 target a 100 % error moves β by only 0.5 % per rollout) or, with relative_error,
    KL/target − 1. No horizon: the step is per rollout whatever the batch size.
    """

    name = "exponential"

    def __init__(
        self,
        init_kl_coef: float,
        target_kl: float,
        gain: float = 0.1,
        kl_coef_min: float = 1e-4,
        kl_coef_max: float = 10.0,
        relative_error: bool = False,
    ) -> None:
        super().__init__(init_kl_coef, target_kl)
        _check(_finite(gain) and gain > 0, "gain", gain, "a finite float > 0")
        _check_bounds(kl_coef_min, kl_coef_max)
        self.gain = float(gain)
        self.kl_coef_min = float(kl_coef_min)
        self.kl_coef_max = float(kl_coef_max)
        self.use_relative_error = bool(relative_error)
        self.beta = min(max(self.beta, self.kl_coef_min), self.kl_coef_max)

    def _step(self, kl: float, n_steps: int) -> float:
        err = self.relative_error(kl) if self.use_relative_error else kl - self.target_kl
        return min(max(self.beta * math.exp(self.gain * err), self.kl_coef_min), self.kl_coef_max)


class PIDController(KLController):
    """PI(D) control of log β on the relative error (after Stooke et al. 2020).

        e_t   = clip(KL/target − 1, ±error_clip)                 (the error adaptive uses, same clip)
        I_t   = I_{t−1} + e_t · n_steps/horizon                  (time in samples, as Ziegler's rule)
        D_t   = d_filter·D_{t−1} + (1 − d_filter)·(u_t − u_{t−1}),  u_t = KL_t/target − 1 unclipped (0 at t=1)
        log β = log β₀ + kp·e_t + ki·I_t + kd·D_t,   clamped to [kl_coef_min, kl_coef_max]

    With kp = kd = 0, ki = 1 this is Ziegler's rule (`adaptive`) in log form, with the same clip, horizon, β₀ and
    bounds: pid differs from adaptive only in its P and D terms. The derivative reads the *unclipped* relative error:
    while KL is far from target the clipped error is constant and carries no trend, yet that is when a KL running
    away (or rising towards the target on its own) must be seen. Anti-windup: conditional integration: on a step
    whose error pushes the output past a bound, the integral moves only as far as that bound, so it never winds up
    while β is saturated and leaves the bound as soon as e changes sign.
    """

    name = "pid"

    def __init__(
        self,
        init_kl_coef: float,
        target_kl: float,
        horizon: float,
        kp: float = 0.5,
        ki: float = 1.0,
        kd: float = 0.0,
        d_filter: float = 0.8,
        error_clip: float = 0.2,
        kl_coef_min: float = 1e-4,
        kl_coef_max: float = 10.0,
    ) -> None:
        super().__init__(init_kl_coef, target_kl)
        _check(init_kl_coef > 0, "init_kl_coef", init_kl_coef, "> 0 for pid (it controls log β)")
        _check(_finite(horizon) and horizon > 0, "horizon", horizon, "a finite number of samples > 0")
        for key, v in (("kp", kp), ("ki", ki), ("kd", kd)):
            _check(_finite(v) and v >= 0, key, v, "a finite float >= 0")
        _check(_finite(d_filter) and 0 <= d_filter < 1, "d_filter", d_filter, "a float in [0, 1)")
        _check(_finite(error_clip) and error_clip > 0, "error_clip", error_clip, "a finite float > 0")
        _check_bounds(kl_coef_min, kl_coef_max, init_kl_coef)
        self.horizon = float(horizon)
        self.kp, self.ki, self.kd = float(kp), float(ki), float(kd)
        self.d_filter = float(d_filter)
        self.error_clip = float(error_clip)
        self.kl_coef_min = float(kl_coef_min)
        self.kl_coef_max = float(kl_coef_max)
        self.integral = 0.0
        self.derivative = 0.0
        self.prev_error: float | None = None

    def _step(self, kl: float, n_steps: int) -> float:
        raw = self.relative_error(kl)
        e = min(max(raw, -self.error_clip), self.error_clip)
        if self.prev_error is not None:
            self.derivative = self.d_filter * self.derivative + (1 - self.d_filter) * (raw - self.prev_error)
        self.prev_error = raw
        lo, hi = math.log(self.kl_coef_min), math.log(self.kl_coef_max)
        base = math.log(self.init_kl_coef) + self.kp * e + self.kd * self.derivative
        integral = self.integral + e * n_steps / self.horizon
        if self._hold_integral(raw):
            integral = self.integral
        if self.ki > 0:  # anti-windup: integrate only up to the bound the error pushes towards
            if e > 0 and base + self.ki * integral > hi:
                integral = max(self.integral, (hi - base) / self.ki)
            elif e < 0 and base + self.ki * integral < lo:
                integral = min(self.integral, (lo - base) / self.ki)
        self.integral = integral
        return math.exp(min(max(base + self.ki * self.integral, lo), hi))

    def _hold_integral(self, raw: float) -> bool:
        return False


class ConditionalPIDController(PIDController):
    """`pid` with conditional integration against windup during the rise: the integral holds while the KL is
    already closing on the target by itself, and integrates only while the error stands still or grows.

        hold iff  u_t · D_t < 0  and  |D_t| ≥ min_rate       (D_t: the filtered change of u = KL/target − 1)

    Why (docs/results.md, pid at 0.2): the KL can rise by only ~0.005 nats/token per rollout (one PPO update's
    reach), so at a 0.2 target it needs ~40 rollouts to arrive whatever β is; meanwhile the error stays at its clip
    and Ziegler's integral winds log β down by 0.05 per rollout, to a β far below the one that holds 0.2, and the KL
    overshoots when it gets there. Holding the integral while the plant is already moving the right way leaves β
    where it was until the KL stalls short of the target (then it integrates again, a stair). min_rate (relative
    error per rollout) keeps batch noise in D from holding it near the target. Everything else, P and D included,
    is pid's: `pid_ci` vs `pid` isolates the integration rule.
    """

    name = "pid_ci"

    def __init__(
        self,
        init_kl_coef: float,
        target_kl: float,
        horizon: float,
        kp: float = 0.5,
        ki: float = 1.0,
        kd: float = 0.0,
        d_filter: float = 0.8,
        error_clip: float = 0.2,
        kl_coef_min: float = 1e-4,
        kl_coef_max: float = 10.0,
        min_rate: float = 0.01,
    ) -> None:
        super().__init__(init_kl_coef, target_kl, horizon, kp, ki, kd, d_filter, error_clip, kl_coef_min, kl_coef_max)
        _check(_finite(min_rate) and min_rate >= 0, "min_rate", min_rate, "a finite float >= 0 (per rollout)")
        self.min_rate = float(min_rate)
        self.holds = 0

    def _hold_integral(self, raw: float) -> bool:
        hold = raw * self.derivative < 0 and abs(self.derivative) >= self.min_rate
        self.holds += int(hold)
        return hold


CONTROLLERS: dict[str, type[KLController]] = {
    c.name: c
    for c in (FixedController, AdaptiveController, ExponentialController, PIDController, ConditionalPIDController)
}


def build_controller(cfg: Mapping[str, Any]) -> KLController:
    """Build a controller from a mapping or DictConfig with `name` and that controller's keys."""
    params = dict(cfg.items())
    name = params.pop("name", None)
    if name not in CONTROLLERS:
        raise ValueError(f"controller.name={name!r} is unknown; valid: {', '.join(CONTROLLERS)}")
    cls = CONTROLLERS[name]
    import inspect

    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"controller {name!r} does not take keys {unknown}; it takes {accepted}")
    missing = [
        p
        for p, spec in inspect.signature(cls.__init__).parameters.items()
        if p != "self" and spec.default is inspect.Parameter.empty and p not in params
    ]
    if missing:
        raise ValueError(f"controller {name!r} needs keys {missing}")
    return cls(**params)
