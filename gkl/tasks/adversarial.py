"""Adversarial training task: TRADES, GKL-AT and PGD-AT, with eps ramp, AWP, weight EMA and the
authors' epoch-level weight average, and an optional second (augmented) view."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from gkl import losses
from gkl.attacks import NORMS, ThreatModel, parse_number, pgd, trades_perturb
from gkl.attacks.defaults import default_step_size
from gkl.checks import check_count, check_non_negative_number, check_number

from .awp import Forward, add_perturbation, awp_perturbation
from .classify import ClassificationTask, OptimizerFactory, SchedulerFactory
from .ema import ema_copy, update_ema
from .weight_average import WeightAverage

OBJECTIVES = ("trades", "gkl", "pgd_at")
# Losses the inner maximisation can compute from (f(x'), f(x), y, class-prior rows).
ATTACK_LOSSES: dict[str, type[nn.Module]] = {
    "trades_kl": losses.TradesKLLoss,
    "gkl": losses.GKLLoss,
    "dkl": losses.DKLLoss,
    "kd": losses.KDLoss,
    "dkd": losses.DKDLoss,
    "ce": losses.CrossEntropyLoss,
}


class AdversarialTask(ClassificationTask):
    """Adversarial training of ``model`` (images in [0, 1] -> logits) against ``norm`` attacks.

    Per batch, with ``eps_t = eps * r``, ``step_t = step_size * r`` and the ramp factor
    ``r = min((epoch + 1) / eps_ramp_epochs, 1)`` (``r = 1`` when ``eps_ramp_epochs = 0``):

    - ``trades``: ``x_adv`` = TRADES inner max of ``KL(f(x) || f(x'))`` (``steps`` steps from
      ``x + 0.001 N(0, I)``);
      ``loss = ce_weight * CE(f(x), y) + trades_beta * KL(f(x) || f(x_adv))``
      (``loss``: :class:`TradesKLLoss`, the default).
    - ``gkl`` (GKL-AT, Cui et al.): the same ``x_adv``;
      ``loss = ce_weight * CE(f(x), y) + GKL(f(x_adv), f(x), class prior rows)``, gradients into
      both branches (``loss``: :class:`GKLLoss`, or :class:`DKLLoss`). With
      ``loss.use_class_prior`` a :class:`ClassPrior` accumulates ``softmax(f(x) / T2)`` of the
      natural logits per true class and is refreshed at each epoch end.
    - ``pgd_at`` (Madry et al.): ``x_adv`` = PGD on CE with a uniform random start;
      ``loss = CE(f(x_adv), y)`` (``loss``: ``None`` or :class:`CrossEntropyLoss`).

    ``attack_loss`` (trades/gkl) is the ascent objective of the inner maximisation:
    ``x_adv`` maximises ``attack_loss(f(x'), f(x), y, class prior rows)`` from
    ``x + 0.001 N(0, I)`` (``None``: the TRADES ``sum_i KL(f(x_i) || f(x'_i))``; a
    :class:`TradesKLLoss` gives the same points). The authors' CIFAR-100 GKL-AT ascends
    ``GKLLoss(alpha=1, beta=1, gamma=1)`` with the class prior of the current epoch.

    A batch ``(x, y, x_aug)`` (a second, augmented view, :mod:`gkl.data.augment`) trains on both
    views as the authors' ``--aug`` code: ``x_adv`` for ``[x; x_aug]``, CE over all ``2B``,
    ``robust = L(first B) + aug_weight * L(second B)``, the class prior from the first view only,
    and AWP's ascent on the unsplit ``2B`` loss.

    The attacks run the model in eval mode (BatchNorm statistics frozen) and restore its mode.
    ``awp_gamma > 0`` adds adversarial weight perturbation (:mod:`gkl.tasks.awp`) of the same loss
    from the 1-based epoch ``awp_warmup_epoch`` on (the AWP code's ``epoch >= awp_warmup``).
    ``ema_decay`` keeps a per-step EMA of weights and buffers (:mod:`gkl.tasks.ema`) that is
    used for validation and testing, saved in checkpoints and exported. ``weight_average = tau``
    keeps the authors' ``swa.py`` average of epoch-end weights (:mod:`gkl.tasks.weight_average`)
    from the 1-based epoch ``weight_average_start``; it is validated, tested and exported (it
    excludes ``ema_decay``). ``adversarial_first`` runs the training forward on ``x_adv`` before
    ``x`` (the GKL-AT code's order; it matters for BatchNorm running statistics only).
    ``val_pgd_subset > 0``
    logs ``val/pgd_acc``: accuracy under PGD-``val_pgd_steps`` (full ``eps``, step
    ``2.5 * eps / steps``, random start from a generator seeded with ``val_pgd_seed``) on the
    first ``val_pgd_subset`` validation images. ``train/acc`` is the accuracy on ``x_adv``.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        loss: nn.Module | None = None,
        attack_loss: nn.Module | None = None,
        objective: str = "trades",
        eps: float | str = "8/255",
        step_size: float | str = "2/255",
        steps: int = 10,
        norm: str = "Linf",
        eps_ramp_epochs: int = 0,
        trades_beta: float = 6.0,
        ce_weight: float = 1.0,
        awp_gamma: float = 0.0,
        awp_warmup_epoch: int = 0,
        ema_decay: float | None = None,
        weight_average: float | None = None,
        weight_average_start: int = 1,
        aug_weight: float = 1.0,
        adversarial_first: bool = False,
        val_pgd_steps: int = 10,
        val_pgd_subset: int = 0,
        val_pgd_seed: int = 0,
        require_generated_data: bool = False,
    ) -> None:
        super().__init__(model, num_classes, optimizer, scheduler)
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; valid names: {list(OBJECTIVES)}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid names: {list(NORMS)}")
        for key, value in (("steps", steps), ("val_pgd_steps", val_pgd_steps)):
            check_count(f"task.{key}", value)
        for key, value in (
            ("eps_ramp_epochs", eps_ramp_epochs),
            ("val_pgd_subset", val_pgd_subset),
            ("val_pgd_seed", val_pgd_seed),
            ("awp_warmup_epoch", awp_warmup_epoch),
        ):
            check_count(f"task.{key}", value, minimum=0, hint=" (0 turns it off)")
        for key, value in (
            ("trades_beta", trades_beta),
            ("ce_weight", ce_weight),
            ("aug_weight", aug_weight),
            ("awp_gamma", awp_gamma),
        ):
            check_non_negative_number(f"task.{key}", value)
        for key, value in (("ema_decay", ema_decay), ("weight_average", weight_average)):
            if value is not None:
                check_number(
                    f"task.{key}", value, low=0, high=1, high_open=True, hint=" (null: off)"
                )
        check_count("task.weight_average_start", weight_average_start)
        if ema_decay and weight_average is not None:
            raise ValueError(
                "task.ema_decay and task.weight_average both choose the released weights; "
                "set one of them to null"
            )
        self.objective = objective
        self.robust_loss = _check_loss(objective, loss)
        self.attack_loss = _check_attack_loss(objective, attack_loss)
        self.aug_weight = aug_weight
        self.adversarial_first = adversarial_first
        # The one place a config's eps is parsed.
        self.eps = ThreatModel.parse(eps, norm=norm, name="task.eps").eps
        self.step_size = parse_number(step_size, "task.step_size")
        self.steps = steps
        self.norm = norm
        self.eps_ramp_epochs = eps_ramp_epochs
        self.trades_beta = trades_beta
        self.ce_weight = ce_weight
        self.awp_gamma = awp_gamma
        self.awp_warmup_epoch = awp_warmup_epoch
        self.ema_decay = ema_decay or None
        self.val_pgd_steps = val_pgd_steps
        self.val_pgd_subset = val_pgd_subset
        self.val_pgd_seed = val_pgd_seed
        self.require_generated_data = require_generated_data
        # The training loss and the attack loss read one prior of softmax(f(x) / T2).
        robust_prior_user = loss if objective == "gkl" else None
        self.class_prior = losses.class_prior_for(num_classes, robust_prior_user, self.attack_loss)
        self.ema_model = ema_copy(model) if self.ema_decay else None
        self.averaged_model = (
            WeightAverage(model, weight_average, weight_average_start)
            if weight_average is not None
            else None
        )
        self.val_pgd_acc = MulticlassAccuracy(num_classes, average="micro")
        self._awp: dict[str, Tensor] | None = None
        self._val_seen = 0
        self._val_generator: torch.Generator | None = None

    # --- schedule ---------------------------------------------------------------------------

    def eps_factor(self) -> float:
        """``min((epoch + 1) / eps_ramp_epochs, 1)``, or 1 without a ramp (1-based epochs, as the
        GKL-AT code's ``epsilon * epoch / epochs``)."""
        if self.eps_ramp_epochs <= 0:
            return 1.0
        return min((self.current_epoch + 1) / self.eps_ramp_epochs, 1.0)

    def awp_active(self) -> bool:
        return self.awp_gamma > 0 and self.current_epoch + 1 >= self.awp_warmup_epoch

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated, tested and exported: the epoch-level weight average
        or the EMA when enabled (before the average has started: the model)."""
        if self.averaged_model is not None and int(self.averaged_model.count) > 0:
            return self.averaged_model.model
        return self.ema_model if self.ema_model is not None else self.model

    @property
    def export_model(self) -> nn.Module:
        """The network to release (``export_weights``): the weight average or EMA when enabled."""
        return self.eval_model

    # --- training ---------------------------------------------------------------------------

    def adversarial_examples(self, x: Tensor, y: Tensor, prior: Tensor | None = None) -> Tensor:
        """``x_adv`` for the current epoch's budget (detached, in [0, 1]); ``prior``: the class
        prior rows of ``y`` (for an ``attack_loss`` with ``use_class_prior``)."""
        factor = self.eps_factor()
        eps, step = self.eps * factor, self.step_size * factor
        if self.objective == "pgd_at":
            return pgd(self.model, x, y, eps=eps, step_size=step, steps=self.steps, norm=self.norm)
        objective = None
        attack_loss = self.attack_loss
        if attack_loss is not None and not isinstance(attack_loss, losses.TradesKLLoss):
            rows = prior if getattr(attack_loss, "use_class_prior", False) else None

            def objective(adv_logits: Tensor, nat_logits: Tensor) -> Tensor:
                return attack_loss(adv_logits, nat_logits, y, class_prior=rows)

        return trades_perturb(
            self.model,
            x,
            eps=eps,
            step_size=step,
            steps=self.steps,
            norm=self.norm,
            objective=objective,
        )

    def objective_loss(
        self,
        forward: Forward,
        x: Tensor,
        x_adv: Tensor,
        y: Tensor,
        prior: Tensor | None,
        views: int = 1,
        adversarial_first: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor | None]:
        """``(loss, parts, adversarial logits, natural logits or None)`` with ``forward`` as the
        network (the model, or AWP's functional copy); ``prior``: class-prior rows of ``y``.
        ``views=2``: ``x`` is ``[x; x_aug]`` and the robust term of the second half is weighted
        by ``aug_weight``."""
        if self.objective == "pgd_at":
            adv_logits = forward(x_adv)
            return F.cross_entropy(adv_logits, y), {}, adv_logits, None
        if adversarial_first:  # the GKL-AT code's order
            adv_logits = forward(x_adv)
            nat_logits = forward(x)
        else:  # natural first, then adversarial: the TRADES code's order
            nat_logits = forward(x)
            adv_logits = forward(x_adv)
        ce = F.cross_entropy(nat_logits, y)
        if views == 1:
            robust = self._robust(adv_logits, nat_logits, y, prior)
        else:
            b = len(y) // 2
            rows = (None, None) if prior is None else (prior[:b], prior[b:])
            robust = self._robust(
                adv_logits[:b], nat_logits[:b], y[:b], rows[0]
            ) + self.aug_weight * self._robust(adv_logits[b:], nat_logits[b:], y[b:], rows[1])
        loss = self.ce_weight * ce + robust
        return loss, {"ce": ce, "robust": robust}, adv_logits, nat_logits

    def _robust(self, adv: Tensor, nat: Tensor, y: Tensor, prior: Tensor | None) -> Tensor:
        if self.objective == "trades":
            return self.trades_beta * self.robust_loss(adv, nat, y)
        uses_prior = getattr(self.robust_loss, "use_class_prior", False)
        return self.robust_loss(adv, nat, y, class_prior=prior if uses_prior else None)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y, *second = batch
        views = 1 + len(second)
        if views == 2:
            if self.objective == "pgd_at":
                raise ValueError("objective='pgd_at' does not train on a second view")
            first_y = y
            x, y = torch.cat((x, second[0])), torch.cat((y, y))
        prior = self.class_prior.rows(y, x.dtype) if self.class_prior is not None else None
        x_adv = self.adversarial_examples(x, y, prior)
        if self.awp_active():
            # AWP ascends the unsplit loss over all views (the authors' calc_awp).
            self._awp = awp_perturbation(
                self.model,
                lambda forward: self.objective_loss(forward, x, x_adv, y, prior)[0],
                self.awp_gamma,
            )
            add_perturbation(self.model, self._awp, 1.0)
        loss, parts, adv_logits, nat_logits = self.objective_loss(
            self.model, x, x_adv, y, prior, views, self.adversarial_first
        )
        if self.class_prior is not None:
            if views == 2:
                self.class_prior.update(nat_logits[: len(first_y)], first_y)
            else:
                self.class_prior.update(nat_logits, y)
        self.log_train(loss, adv_logits, y, parts)
        self.log("train/eps", self.eps * self.eps_factor(), on_step=False, on_epoch=True)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Step at the perturbed weights, then remove the AWP perturbation and update the EMA.

        Runs before any callback's ``on_train_batch_end``, so checkpoints never hold perturbed
        weights.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._awp is not None:
            add_perturbation(self.model, self._awp, -1.0)
            self._awp = None
        if self.ema_model is not None:
            update_ema(self.ema_model, self.model, self.ema_decay)

    def on_fit_start(self) -> None:
        trainer = self.trainer
        if self.awp_gamma > 0 and trainer.accumulate_grad_batches != 1:
            raise ValueError(
                "AWP removes its weight perturbation after each optimizer step, so it needs "
                f"trainer.accumulate_grad_batches=1 (got {trainer.accumulate_grad_batches})"
            )
        datamodule = trainer.datamodule
        if (
            self.require_generated_data
            and not getattr(datamodule, "is_synthetic", False)
            and getattr(datamodule, "generated_path", None) is None
        ):
            raise ValueError(
                "this experiment trains on generated images: set data.generated_path=<DM-AT "
                ".npz with 'image' (N, 32, 32, 3) uint8 and 'label'>"
            )

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """After the epoch's last batch (before validation): fold the epoch-end weights into the
        weight average."""
        if self.averaged_model is not None and batch_idx + 1 == self.trainer.num_training_batches:
            self.averaged_model.update(self.model, self.current_epoch + 1)

    # --- evaluation -------------------------------------------------------------------------

    def _evaluate(self, batch, metric: MulticlassAccuracy, stage: str) -> None:
        x, y = batch
        logits = self.eval_model(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        metric(logits, y)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self._val_seen = 0
        self._val_generator = torch.Generator(device=self.device).manual_seed(self.val_pgd_seed)

    def validation_step(self, batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        x, y = batch
        take = min(len(x), self.val_pgd_subset - self._val_seen)
        self._val_seen += len(x)
        if take <= 0:
            return
        # Lightning validates in inference mode; attacks need autograd on normal tensors.
        with torch.inference_mode(False):
            xs, ys = x[:take].clone(), y[:take].clone()
            x_adv = pgd(
                self.eval_model,
                xs,
                ys,
                eps=self.eps,
                step_size=default_step_size(self.eps, self.val_pgd_steps),
                steps=self.val_pgd_steps,
                norm=self.norm,
                generator=self._val_generator,
            )
            with torch.no_grad():
                logits = self.eval_model(x_adv)
        self.val_pgd_acc(logits, ys)
        self.log("val/pgd_acc", self.val_pgd_acc, on_epoch=True, prog_bar=True)


def _check_loss(objective: str, loss: nn.Module | None) -> nn.Module | None:
    """The robust-term module for ``objective``, or a ``ValueError`` naming the right loss."""
    if objective == "trades":
        if loss is None:
            return losses.TradesKLLoss()
        if not isinstance(loss, losses.TradesKLLoss):
            raise ValueError(
                f"objective='trades' uses TradesKLLoss (weighted by task.trades_beta), got "
                f"{type(loss).__name__}: set loss=trades_kl; for GKL use objective='gkl' loss=gkl"
            )
    elif objective == "gkl":
        if not isinstance(loss, losses.GKLLoss | losses.DKLLoss):
            got = type(loss).__name__ if loss is not None else None
            raise ValueError(f"objective='gkl' needs loss=gkl (GKLLoss) or dkl, got {got}")
    elif loss is not None and not isinstance(loss, losses.CrossEntropyLoss):
        raise ValueError(
            f"objective='pgd_at' trains on CE(f(x_adv), y); use loss=ce, got {type(loss).__name__}"
        )
    return loss if objective != "pgd_at" else None


def _check_attack_loss(objective: str, attack_loss: nn.Module | None) -> nn.Module | None:
    """``attack_loss`` if the inner maximisation can compute it, else a ``ValueError``."""
    if attack_loss is None:
        return None
    name = type(attack_loss).__name__
    if objective == "pgd_at":
        raise ValueError(
            f"task.attack_loss={name} is not used by objective='pgd_at' (PGD on CE(f(x'), y) "
            "from a uniform random start); set task.attack_loss=null"
        )
    if not isinstance(attack_loss, tuple(ATTACK_LOSSES.values())):
        valid = ", ".join(f"{k} ({v.__name__})" for k, v in ATTACK_LOSSES.items())
        raise ValueError(
            f"task.attack_loss={name} cannot be the inner maximisation's objective: the attack "
            "only has the adversarial logits f(x'), the natural logits f(x) (in place of a "
            "teacher), the labels and the class-prior rows. Valid losses: "
            f"{valid}, or null (the TRADES KL ascent)"
        )
    return attack_loss
