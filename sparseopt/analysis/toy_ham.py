"""The HAM toy model of the paper's appendix A: one neuron with full-batch BatchNorm.

Student ``f(x) = sum_k a_k * relu(gamma_k * zhat_k(x) + b_k)`` with
``zhat_k = (w_k . x - mean) / std`` over the full data set (full-batch BN),
trained with mean squared error on a teacher of the same form whose last
``redundant`` inputs have zero weight; the student masks those inputs.

Conserved quantities (per neuron), from positive homogeneity of ReLU:

* gradient flow:  ``a^2 - gamma^2 - b^2``;
* HAM flow (inverse metric ``1 + alpha |a|`` on ``a``, BN parameters unchanged):
  ``F(a) - gamma^2 - b^2`` with ``F(a) = (2 / alpha) (|a| - ln(1 + alpha |a|) / alpha)``.

With the balanced initialisation ``a^2 = gamma^2 + b^2`` and ``a`` of the
opposite sign to the teacher, gradient descent cannot flip ``a`` (its
invariant pins ``|a|`` to ``sqrt(gamma^2 + b^2)`` > 0) while HAM can, and so
recovers the teacher. Masking and the SparseOpt scaling act on ``w`` only and
do not touch either invariant.

SparseOpt scaling here multiplies the gradient of ``w_k`` by ``c_k``. With one
neuron ``sqrt(n / n_avg) = 1``, so for the one-neuron model we use the factor
relative to a dense neuron, ``sqrt(n / N)`` (documented choice); the
two-neuron model uses SparseOpt's ``sqrt(n_k / n_avg)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..figures import pyplot, save_figure, write_csv
from ..files import write_json


def F(a: torch.Tensor, alpha: float) -> torch.Tensor:
    """HAM's potential: ``F(a) = (2/alpha) (|a| - ln(1 + alpha |a|) / alpha)``, with ``F'(a) = 2a / (1 + alpha |a|)``."""
    x = a.abs()
    return (2.0 / alpha) * (x - torch.log1p(alpha * x) / alpha)


@dataclass
class ToySetup:
    dim: int = 10
    redundant: int = 5
    samples: int = 256
    teacher_a: float = 1.0
    student_a: float = -1.0
    gamma: float = 0.6  # with b: gamma^2 + b^2 = a^2 (balanced)
    b: float = 0.8
    seed: int = 0
    neurons: int = 1  # 2: one dense neuron + one correctly masked neuron


@dataclass
class Trajectory:
    label: str
    a: list[list[float]] = field(default_factory=list)  # per step, per neuron
    invariant: list[list[float]] = field(default_factory=list)
    scale: float = 1.0  # size of the invariant's terms at t = 0, to express drift relatively
    loss: list[float] = field(default_factory=list)


def make_problem(setup: ToySetup):
    g = torch.Generator().manual_seed(setup.seed)
    x = torch.randn(setup.samples, setup.dim, generator=g, dtype=torch.float64)
    w_teacher = torch.randn(setup.dim, generator=g, dtype=torch.float64)
    w_teacher[setup.dim - setup.redundant :] = 0.0
    z = x @ w_teacher
    y = setup.teacher_a * torch.relu((z - z.mean()) / z.std(unbiased=False))
    active = torch.ones(setup.neurons, setup.dim, dtype=torch.float64)
    active[-1, setup.dim - setup.redundant :] = 0.0  # the (last) sparse neuron masks the redundant inputs
    w0 = torch.randn(setup.neurons, setup.dim, generator=g, dtype=torch.float64) * active
    return x, y, w0, active


def forward(x, w, gamma, b, a):
    z = x @ w.T  # (samples, neurons)
    zhat = (z - z.mean(0)) / z.std(0, unbiased=False)
    return torch.relu(gamma * zhat + b) @ a


def train_toy(setup: ToySetup, method: str, lr: float, steps: int, alpha: float = 1.0, scaling: bool = False,
              record_every: int = 10) -> Trajectory:
    """Full-batch gradient descent (``method="gd"``) or HAM (``"ham"``, beta = 0) on the toy problem."""
    if method not in ("gd", "ham"):
        raise ValueError(f"method must be 'gd' or 'ham', got {method!r}")
    x, y, w0, active = make_problem(setup)
    k = setup.neurons
    w = w0.clone().requires_grad_(True)
    gamma = torch.full((k,), setup.gamma, dtype=torch.float64, requires_grad=True)
    b = torch.full((k,), setup.b, dtype=torch.float64, requires_grad=True)
    a = torch.full((k,), setup.student_a, dtype=torch.float64, requires_grad=True)
    n = active.sum(1)
    if scaling:
        c = torch.sqrt(n / setup.dim) if k == 1 else torch.sqrt(n / n.mean())
    else:
        c = torch.ones(k, dtype=torch.float64)
    traj = Trajectory(f"{'HAM' if method == 'ham' else 'GD'}{' + scaling' if scaling else ''}")

    def invariant():
        base = F(a, alpha) if method == "ham" else a**2
        return (base - gamma**2 - b**2).detach().tolist()

    with torch.no_grad():
        traj.scale = ((F(a, alpha) if method == "ham" else a**2) + gamma**2 + b**2).max().item()
    for step in range(steps + 1):
        loss = 0.5 * ((forward(x, w, gamma, b, a) - y) ** 2).mean()
        if step % record_every == 0 or step == steps:
            traj.a.append(a.detach().tolist())
            traj.invariant.append(invariant())
            traj.loss.append(loss.item())
        if step == steps:
            break
        for p in (w, gamma, b, a):
            p.grad = None
        loss.backward()
        with torch.no_grad():
            w -= lr * w.grad * active * c[:, None]  # masked, optionally SparseOpt-scaled
            gamma -= lr * gamma.grad
            b -= lr * b.grad
            a_grad = a.grad.clone()
            a -= lr * a_grad
            if method == "ham":  # hyperbolic step on the outer weight (BN parameters keep the flat metric)
                a *= torch.exp((lr * (-alpha * torch.sign(a) * a_grad)).clamp(-5, 5))
    return traj


def drift(traj: Trajectory) -> float:
    """Largest change of the conserved quantity over the run, relative to the size of its terms at t = 0.

    (The balanced initialisation makes the GD invariant itself 0, so it is measured against
    ``a^2 + gamma^2 + b^2``.)"""
    first = torch.tensor(traj.invariant[0])
    worst = max((torch.tensor(v) - first).abs().max().item() for v in traj.invariant)
    return worst / traj.scale


def run_toy_ham(out: str | Path, *, lr: float = 0.05, steps: int = 4000, alpha: float = 1.0, seed: int = 0) -> dict:
    out = Path(out)
    summary: dict = {"setup": {"lr": lr, "steps": steps, "alpha": alpha, "seed": seed}}
    plt = pyplot()
    rows = []
    for neurons in (1, 2):
        setup = ToySetup(seed=seed, neurons=neurons)
        trajs = [train_toy(setup, m, lr, steps, alpha, scaling=s) for m in ("gd", "ham") for s in (False, True)]
        key = "one_neuron" if neurons == 1 else "two_neurons"
        summary[key] = {
            t.label: {"final_a": t.a[-1], "final_loss": t.loss[-1], "invariant_drift": drift(t),
                      "sign_flipped": [math.copysign(1, v) != math.copysign(1, setup.student_a) for v in t.a[-1]]}
            for t in trajs
        }
        for t in trajs:
            for i, (a, inv, loss) in enumerate(zip(t.a, t.invariant, t.loss)):
                rows.append({"model": key, "run": t.label, "record": i, "loss": loss,
                             **{f"a{j}": v for j, v in enumerate(a)}, **{f"invariant{j}": v for j, v in enumerate(inv)}})
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for i, t in enumerate(trajs):
            steps_axis = [j * 10 for j in range(len(t.a))]
            for n_idx in range(neurons):
                style = "-" if n_idx == neurons - 1 else ":"
                suffix = "" if neurons == 1 else (" (sparse neuron)" if n_idx == 1 else " (dense neuron)")
                axes[0].plot(steps_axis, [v[n_idx] for v in t.a], style, color=f"C{i}", label=t.label + suffix)
                axes[1].plot(steps_axis, [v[n_idx] for v in t.invariant], style, color=f"C{i}", label=t.label + suffix)
            axes[2].plot(steps_axis, t.loss, color=f"C{i}", label=t.label)
        axes[0].axhline(0, color="k", lw=0.5)
        axes[0].set(xlabel="step", ylabel="outer weight a", title="outer weight (teacher: a > 0)")
        axes[1].set(xlabel="step", ylabel="conserved quantity",
                    title="GD: a^2 - gamma^2 - b^2;  HAM: F(a) - gamma^2 - b^2")
        axes[2].set(xlabel="step", ylabel="MSE loss", yscale="log", title="loss")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"HAM toy model, {'one neuron' if neurons == 1 else 'one dense + one masked neuron'} (lr {lr})")
        save_figure(fig, out / f"toy_ham_{key}.png")
    write_csv(out / "toy_ham.csv", rows)
    write_json(out / "toy_ham.json", summary)
    return summary
