r"""SP2OT training (paper Algorithm 4): a cosine cluster head trained on (S)P2OT pseudo-labels.

Per step, for a batch of ``B`` samples seen through two views ``a`` and ``b``:

1. logits ``z_a, z_b = head(encode(view))`` (``B x K``);
2. a memory bank (FIFO ring of the last ``bank_batches * B`` detached logits and their
   dataset indices) is extended with the batch; the pseudo-label problem is solved on the
   whole bank, ``Q = SP2OT(-log softmax(bank), S[bank, bank], rho(t), lam_s(t))``, and the
   batch's rows of ``N_bank * Q`` are the soft targets ``T_a, T_b`` (rows sum to the sample
   weight ``w_i in [0, 1]``);
3. loss ``= -sum_i [T_b,i . log softmax(z_a,i) + T_a,i . log softmax(z_b,i)] / B``;
4. Adam, learning rate cosine-decayed from ``lr`` to ``lr_min``.

``rho(t)`` follows :func:`sp2ot_engine.ot.rho_schedule`, ``lam_s(t)`` follows
:func:`sp2ot_engine.ot.semantic_strength` (scaled to the bank size). The epoch with the
lowest ``loss / rho`` is kept (model selection of the paper).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from sp2ot_engine.errors import Cancelled
from sp2ot_engine.graph import subgraph
from sp2ot_engine.ot import SolverInfo, rho_schedule, semantic_strength, solve_sp2ot, solve_transport

ProgressFn = Callable[[dict], None]
StopFn = Callable[[], bool]


class CosineHead(nn.Module):
    """Weight-normalised linear layer without bias: ``logits = scale * <f/|f|, w_j/|w_j|>``.
    The random prototypes are drawn from ``generator`` (default: torch's global one)."""

    def __init__(self, in_features: int, n_clusters: int, scale: float = 10.0, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        weight = torch.randn(n_clusters, in_features, generator=generator)
        self.weight = nn.Parameter(weight / math.sqrt(in_features))
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).T


@dataclass
class TrainConfig:
    """Hyper-parameters of the training loop (defaults: the paper's, see ``method.md``)."""

    n_clusters: int
    epochs: int = 50
    batch_size: int = 512
    bank_batches: int = 10
    lr: float = 5e-4
    lr_min: float = 5e-6
    rho0: float = 0.1
    rho_kind: str = "sigmoid"
    eps: float = 0.1
    lam: float = 1.0
    lam_s0: float = 1000.0
    formulation: str = "sp2ot"  # sp2ot | p2ot | pot | uot | ot
    solver_tol: float = 1e-6
    mm_max_iter: int = 100
    mm_tol: float = 1e-6  # per-step pseudo-labels need no more; the solver's default is 1e-8
    seed: int = 0


@dataclass
class TrainResult:
    head_state: dict
    encoder_state: dict | None
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0


class MemoryBank:
    """FIFO ring of the last ``capacity`` detached logits with their dataset indices.

    A sample appears at most once: when it comes back in a new batch its older entry is
    dropped (on small data sets the bank would otherwise fill with copies of the same rows).
    """

    def __init__(self, capacity: int, n_clusters: int, device: torch.device) -> None:
        self.logits = torch.empty(0, n_clusters, device=device)
        self.index = torch.empty(0, dtype=torch.long)
        self.capacity = capacity

    def _older(self, index: torch.Tensor) -> torch.Tensor:
        return ~torch.isin(self.index, index.cpu())

    def with_batch(self, logits: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank + batch (the batch last, older copies of its samples left out), bank unchanged."""
        keep = self._older(index)
        return (torch.cat([self.logits[keep.to(self.logits.device)], logits.detach()]),
                torch.cat([self.index[keep], index.cpu()]))

    def push(self, logits: torch.Tensor, index: torch.Tensor) -> None:
        bank_logits, bank_index = self.with_batch(logits, index)
        self.logits, self.index = bank_logits[-self.capacity:], bank_index[-self.capacity:]


class PseudoLabeller:
    """Solves the pseudo-label problem on a bank, warm-starting from the previous solve."""

    def __init__(self, cfg: TrainConfig, graph: sp.csr_matrix | None) -> None:
        self.cfg = cfg
        self.graph = graph
        self.potentials: dict[str, torch.Tensor | None] = {}
        self.last_info: SolverInfo | None = None
        self._sub_index: torch.Tensor | None = None
        self._sub: sp.csr_matrix | None = None

    def _subgraph(self, index: torch.Tensor) -> sp.csr_matrix:
        # Both views of a step solve on the same bank rows: extract their sub-graph once.
        if self._sub_index is None or not torch.equal(self._sub_index, index):
            self._sub_index, self._sub = index.clone(), subgraph(self.graph, index.numpy())
        return self._sub

    def __call__(self, logits: torch.Tensor, index: torch.Tensor, rho: float, key: str = "") -> torch.Tensor:
        """Plan ``Q`` (``M x K``) for bank logits ``M x K`` with dataset indices ``index``."""
        cfg = self.cfg
        cost = -torch.log_softmax(logits.detach().double(), dim=1)
        init = self.potentials.get(key)
        if cfg.formulation == "sp2ot" and self.graph is not None:
            lam_s = semantic_strength(rho, cfg.lam_s0, n=cost.shape[0])
            q, info = solve_sp2ot(cost, self._subgraph(index), rho, lam_s=lam_s, eps=cfg.eps,
                                  lam=cfg.lam, tol=cfg.solver_tol, mm_max_iter=cfg.mm_max_iter, mm_tol=cfg.mm_tol,
                                  init=init,
                                  return_info=True)
        else:
            form = "p2ot" if cfg.formulation == "sp2ot" else cfg.formulation
            q, info = solve_transport(cost, rho, formulation=form, eps=cfg.eps, lam=cfg.lam, tol=cfg.solver_tol,
                                      init=init, return_info=True)
        self.potentials[key] = info.potentials
        self.last_info = info
        return q


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-sum_ij T_ij log softmax(z)_ij / B`` with soft, weighted targets ``T`` (rows sum to w_i)."""
    return -(targets * torch.log_softmax(logits, dim=1)).sum() / logits.shape[0]


def train_head(
    cfg: TrainConfig,
    encoder: nn.Module | None,
    head: CosineHead,
    batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
    steps_per_epoch: int,
    graph: sp.csr_matrix | None,
    device: torch.device,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> TrainResult:
    """Run the SP2OT training loop.

    Args:
        cfg: hyper-parameters.
        encoder: module mapping a view to features (trainable parameters are optimised
            too), or ``None`` when views already are features (fast mode).
        head: the cosine cluster head.
        batches: ``batches(epoch)`` yields ``(index, view_a, view_b)`` per step.
        steps_per_epoch: number of steps ``batches`` yields per epoch.
        graph: the ``N x N`` kNN similarity (SP2OT), or ``None``.
        progress: called with ``{stage, epoch, step, total_steps, loss, rho, percent}``.
        should_stop: polled between steps; if it returns True, :class:`Cancelled` is raised.
    """
    params = list(head.parameters())
    if encoder is not None:
        params += [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    total = max(1, cfg.epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=cfg.lr_min)
    bank = MemoryBank(cfg.bank_batches * cfg.batch_size, cfg.n_clusters, device)
    labeller = PseudoLabeller(cfg, graph)
    history: list[dict] = []
    best = (math.inf, None, None, 0)
    step = 0
    for epoch in range(cfg.epochs):
        head.train()
        if encoder is not None:
            encoder.train()
        loss_sum, n_seen, rho_sum = 0.0, 0, 0.0
        t0 = time.perf_counter()
        for index, view_a, view_b in batches(epoch):
            if should_stop is not None and should_stop():
                raise Cancelled("training cancelled")
            rho = rho_schedule(step, total, cfg.rho0, cfg.rho_kind)
            view_a, view_b = view_a.to(device, non_blocking=True), view_b.to(device, non_blocking=True)
            z_a = head(encoder(view_a) if encoder is not None else view_a)
            z_b = head(encoder(view_b) if encoder is not None else view_b)
            b = z_a.shape[0]
            with torch.no_grad():
                targets = []
                for key, z in (("a", z_a), ("b", z_b)):
                    logits, idx = bank.with_batch(z, index)
                    q = labeller(logits, idx, rho, key)
                    targets.append((q[-b:] * q.shape[0]).to(z.dtype))
            loss = soft_cross_entropy(z_a, targets[1]) + soft_cross_entropy(z_b, targets[0])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bank.push(z_a, index)
            loss_sum += float(loss.detach()) * b
            rho_sum += rho * b
            n_seen += b
            step += 1
            if progress is not None:
                progress({"stage": "training", "epoch": epoch + 1, "epochs": cfg.epochs, "step": step,
                          "total_steps": total, "loss": float(loss.detach()), "rho": rho, "percent": 100.0 * step / total})
        mean_loss = loss_sum / max(n_seen, 1)
        mean_rho = rho_sum / max(n_seen, 1)
        history.append({"epoch": epoch + 1, "loss": mean_loss, "rho": mean_rho,
                        "seconds": time.perf_counter() - t0})
        score = mean_loss / mean_rho
        if score < best[0]:
            enc_state = None
            if encoder is not None:
                enc_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
            best = (score, copy.deepcopy(head.state_dict()), enc_state, epoch + 1)
    return TrainResult(head_state=best[1], encoder_state=best[2], history=history, best_epoch=best[3])


def feature_batches(features: torch.Tensor, batch_size: int, seed: int, noise: float = 0.05,
                    drop: float = 0.1) -> tuple[Callable[[int], Iterator], int]:
    """Fast-mode views: cached features with feature-space augmentation.

    Each view is ``dropout(f, drop) + noise * std(f) * N(0, 1)``: two independent
    perturbations of the cached (un-augmented) backbone feature stand in for two augmented
    images, since the frozen backbone would otherwise have to run once per view per epoch.
    The last partial batch is dropped when a full one exists (as ``drop_last``).
    """
    n = features.shape[0]
    batch = min(batch_size, n)
    steps = max(1, n // batch)
    scale = float(features.std()) * noise

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            f = features[idx]
            views = []
            for _ in range(2):
                keep = (torch.rand(f.shape, generator=gen) >= drop).to(f.dtype) / (1.0 - drop)
                views.append(f * keep + scale * torch.randn(f.shape, generator=gen))
            yield idx, views[0], views[1]

    return batches, steps


def predict_logits(head: CosineHead, features: torch.Tensor, device: torch.device, batch: int = 4096) -> torch.Tensor:
    """Head logits for cached features (``N x K``, float32, CPU)."""
    head.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, features.shape[0], batch):
            out.append(head(features[s:s + batch].to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, head.weight.shape[0])


def assignment_confidence(logits: torch.Tensor, labels: np.ndarray, cfg: TrainConfig, rho: float = 1.0) -> np.ndarray:
    """Each sample's transport mass on its assigned cluster, ``N * Q[i, label_i]`` in ``[0, 1]``.

    ``Q`` solves the final pseudo-label problem (P2OT with the final ``rho``) over all ``N``
    samples, so the confidence reflects both the model and the imbalance-aware transport.
    """
    n, k = logits.shape
    if n < k:
        return np.ones(n)
    cost = -torch.log_softmax(logits.double(), dim=1)
    form = "p2ot" if cfg.formulation == "sp2ot" else cfg.formulation
    q = solve_transport(cost, rho, formulation=form, eps=cfg.eps, lam=cfg.lam, tol=cfg.solver_tol)
    conf = (q[torch.arange(n), torch.from_numpy(labels)] * n).clamp(0.0, 1.0)
    return conf.numpy()
