"""Posteriors that mean what they say: calibration under a stated prior, Bayes re-weighting to another case mix,
and the case mix of unlabelled traffic estimated from the model's own posteriors.

Three separate steps (docs/CLINICAL.md):

1. **Calibration.** A network's raw softmax is fitted on out-of-fold predictions with *bias-corrected temperature
   scaling* (one temperature + one bias per class; Alexandari, Kundaje & Shrikumar, ICML 2020). The result is a
   posterior P(class | lesion) under the class mix of the lesions it was fitted on — the training prior, which the
   bundle stores beside it. The per-class biases also undo the prior a class-balanced sampler trained under.
2. **Deployment prior.** A clinic whose case mix differs (more nevi, fewer carcinomas) gets posteriors re-weighted by
   Bayes' rule: p'(c | x) ∝ p(c | x) · π'(c) / π(c). Under label shift (the look of a class does not change, only how
   often it comes) this is exact.
3. **Estimated prior.** Without labels, the case mix of recent traffic is estimated by EM on the posteriors
   (Saerens, Latinne & Decaestecker, Neural Computation 2002) — what a monitoring system exports to see a change of
   case mix before any label comes back. Calibrated posteriors are what makes EM work (Alexandari et al. 2020).

Decisions (the balanced-accuracy rule, an operating point, a prediction set) are *not* made here: see
``evaluation.decision_rules`` and ``evaluation.conformal``.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize

_EPS = 1e-12


def _log(p) -> np.ndarray:
    return np.log(np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def normalise_prior(prior) -> np.ndarray:
    """A class prior as a float vector summing to 1 (zeros kept as a tiny positive number, so Bayes' rule stays
    defined); raises on a negative or all-zero vector."""
    p = np.asarray(prior, dtype=np.float64)
    if p.ndim != 1 or (p < 0).any() or not np.isfinite(p).all() or p.sum() <= 0:
        raise ValueError(f"a prior must be non-negative numbers with a positive sum, got {prior}")
    p = np.clip(p / p.sum(), 1e-9, None)
    return p / p.sum()


# ---------------------------------------------------------------------------- 1. calibration
def apply_bias_temperature(raw, temperature: float = 1.0, bias=None) -> np.ndarray:
    """softmax(log raw / T + b): the posterior under the prior the calibration was fitted on (the one
    implementation; ``calibration.apply_temperature`` is this)."""
    z = _log(raw) / float(temperature)
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)[None, :]
    return _softmax(z)


def fit_bias_temperature(y_true, raw, *, l2: float = 1e-4) -> tuple[float, list[float]]:
    """(temperature, per-class bias) minimising the log-loss of ``softmax(log raw / T + b)`` on labelled rows.

    ``y_true``: N×C one-hot (or N class indices). The biases are centred (softmax ignores a common shift); a tiny
    L2 penalty keeps the bias of a class with no examples finite. Bounded on T ∈ [0.05, 20].
    """
    logp = _log(raw)
    n, c = logp.shape
    y = np.asarray(y_true)
    if y.ndim == 1:
        y = np.eye(c)[y.astype(int)]
    y = y.astype(np.float64)

    def objective(theta):
        s, b = theta[0], theta[1:]
        z = logp * s + b[None, :]
        z = z - z.max(1, keepdims=True)
        logz = np.log(np.exp(z).sum(1, keepdims=True))
        logq = z - logz
        q = np.exp(logq)
        loss = -(y * logq).sum() / n + l2 * (b @ b)
        d = (q - y) / n
        grad = np.concatenate([[float((d * logp).sum())], d.sum(0) + 2 * l2 * b])
        return loss, grad

    res = minimize(objective, np.r_[1.0, np.zeros(c)], jac=True, method="L-BFGS-B",
                   bounds=[(1 / 20.0, 1 / 0.05)] + [(None, None)] * c)
    s, b = float(res.x[0]), res.x[1:]
    return 1.0 / s, (b - b.mean()).tolist()


# ---------------------------------------------------------------------------- 2. another case mix
def reweight_prior(posteriors, from_prior, to_prior) -> np.ndarray:
    """Bayes' rule for a new case mix: p'(c | x) ∝ p(c | x) · to(c) / from(c); rows sum to 1."""
    p = np.asarray(posteriors, dtype=np.float64)
    w = normalise_prior(to_prior) / normalise_prior(from_prior)
    q = p * w[None, :]
    return q / np.clip(q.sum(1, keepdims=True), _EPS, None)


def prior_weights(labels, from_prior, to_prior) -> np.ndarray:
    """Importance weights that make labelled rows drawn under ``from_prior`` stand for ``to_prior`` (mean 1):
    rates measured on out-of-fold lesions, re-weighted to a clinic's case mix."""
    w = normalise_prior(to_prior) / normalise_prior(from_prior)
    idx = np.asarray(labels)
    idx = idx.argmax(1) if idx.ndim == 2 else idx.astype(int)
    out = w[idx]
    return out / out.mean()


# ---------------------------------------------------------------------------- 3. the prior of unlabelled traffic
def estimate_prior_em(posteriors, train_prior, *, tol: float = 1e-6, max_iter: int = 1000) -> dict:
    """The class prior of unlabelled lesions by expectation-maximisation (Saerens et al. 2002).

    ``posteriors``: N×C calibrated posteriors under ``train_prior``. Iterates π ← mean over lesions of the posterior
    re-weighted to π. Returns ``{"prior", "iterations", "converged", "n"}``; with no lesions, the training prior.
    """
    p = np.asarray(posteriors, dtype=np.float64)
    pi0 = normalise_prior(train_prior)
    if p.size == 0:
        return {"prior": pi0.tolist(), "iterations": 0, "converged": True, "n": 0}
    pi = pi0.copy()
    for it in range(1, max_iter + 1):
        new = reweight_prior(p, pi0, pi).mean(0)
        new = new / new.sum()
        done = float(np.abs(new - pi).max()) < tol
        pi = new
        if done:
            return {"prior": pi.tolist(), "iterations": it, "converged": True, "n": int(len(p))}
    return {"prior": pi.tolist(), "iterations": max_iter, "converged": False, "n": int(len(p))}


def prior_shift_distance(prior_a, prior_b) -> float:
    """Total-variation distance between two class priors (0 = the same mix, 1 = disjoint): one number an alert
    rule can watch."""
    return float(0.5 * np.abs(normalise_prior(prior_a) - normalise_prior(prior_b)).sum())
