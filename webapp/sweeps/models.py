"""A sweep: a base run, a search space over its settings, a budget and a metric to optimise; its trials are
ordinary runs. Optuna drives the search from these rows (see services.study_of)."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from webapp.training.models import TrainingRun


class SweepState(models.TextChoices):
    RUNNING = "running"
    FINISHED = "finished"  # the budget is spent and every trial has ended
    STOPPED = "stopped"  # stopped by a person: no new trials; running ones finish


class TrialState(models.TextChoices):
    ACTIVE = "active"  # its run is queued, running or paused
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"


class Sweep(models.Model):
    NOUN = "sweep"
    SAMPLERS = [("grid", "grid"), ("random", "random"), ("tpe", "TPE")]
    PRUNERS = [("none", "none"), ("median", "median"), ("successive_halving", "successive halving"),
               ("hyperband", "Hyperband")]
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="sweeps")
    name = models.CharField(max_length=200)
    # The base run configuration: the run whose inputs every trial clones, and settings fixed for every trial.
    base_run = models.ForeignKey(TrainingRun, on_delete=models.PROTECT, related_name="sweeps_based_on")
    base_settings = models.JSONField(default=dict, blank=True)
    space = models.JSONField(default=dict)  # {setting: {"type": "float"|"int"|"categorical", ...}}
    # Settings to try first, in order, before the sampler chooses (Optuna's enqueue_trial): a known baseline, a
    # colleague's guess. Each is a {setting: value} over the space; settings left out are sampled.
    first_trials = models.JSONField(default=list, blank=True)
    num_runs = models.PositiveIntegerField(default=8)
    runs_at_once = models.PositiveIntegerField(default=1)
    metric = models.CharField(max_length=100, default="eval_loss")  # a key of the runs' metric points
    direction = models.CharField(max_length=10, choices=[("minimize", "minimize"), ("maximize", "maximize")],
                                 default="minimize")
    sampler = models.CharField(max_length=20, choices=SAMPLERS, default="tpe")
    pruner = models.CharField(max_length=20, choices=PRUNERS, default="none")
    state = models.CharField(max_length=10, choices=SweepState.choices, default=SweepState.RUNNING)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return self.name


class Trial(models.Model):
    sweep = models.ForeignKey(Sweep, on_delete=models.CASCADE, related_name="trials")
    number = models.PositiveIntegerField()
    run = models.OneToOneField(TrainingRun, on_delete=models.PROTECT, related_name="sweep_trial")
    params = models.JSONField(default=dict)
    # Optuna's own attributes of the trial (e.g. the grid point it took), kept so a rebuilt study sees them.
    system_attrs = models.JSONField(default=dict, blank=True)
    state = models.CharField(max_length=10, choices=TrialState.choices, default=TrialState.ACTIVE)
    value = models.FloatField(null=True, blank=True)
    pruned_at_step = models.IntegerField(null=True, blank=True)

    class Meta:
        ordering = ["number"]
        constraints = [models.UniqueConstraint(fields=["sweep", "number"], name="trial_sweep_number")]

    def __str__(self) -> str:
        return f"{self.sweep} #{self.number}"
