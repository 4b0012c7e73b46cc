"""ASHA that keeps checking: a running trial stops as soon as it leaves the top ``1/rf`` of any rung it passed.

Ray Tune's ``ASHAScheduler`` decides once per rung, when a trial arrives there, against the trials recorded at
that rung *so far*: the first trial to reach a rung always continues, the second continues if it beats the
first, and so on. With few trials, or trials started in order on a small cluster, the early arrivals promote
themselves, and since each promoted one had to beat those before it, they arrive at the next rung in improving
order and all promote again (16 trials, rungs at 3 and 9 of 27 steps: 6 of 16 ran to the end, 46 % of the
exhaustive compute, instead of successive halving's 2 and ~25 %).

:class:`RecheckedASHA` makes the same decision on arrival, and then re-checks the trial at every later report
(the report that reaches the next rung included, before it is recorded there):
once more trials have reached the highest rung it passed, a trial whose loss there is no longer in the top
``1/rf`` of everything recorded at that rung (Ray's own cutoff, the ``1 - 1/rf`` percentile) is stopped. What
survives is about what synchronous successive halving keeps (the top ``1/rf`` of each rung), decided
asynchronously: no trial waits for a rung to fill. A trial is judged on its latest rung only (a longer run is
better evidence than a shorter one), so the best trial of a rung is never stopped by a re-check and the best
of the last rung always finishes. A late stop costs at most the steps to the trial's next report (the rung
interval).

Only the decisions change; rungs, state saving and restoring are Ray's (the class is pickled with the sweep's
Tune state, so it lives in its own importable module).
"""

from __future__ import annotations

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler


class RecheckedASHA(AsyncHyperBandScheduler):
    """``ASHAScheduler`` plus the re-check above (same arguments)."""

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._time_attr not in result or self._metric not in result:
            return super().on_trial_result(tune_controller, trial, result)
        bracket = self._trial_info[trial.trial_id]
        # First against the rung it stood on before this report: a report that reaches the next rung must not
        # let a trial that has meanwhile fallen out of the top at the last one through (with rf=2 and reports
        # at the rungs there is no report in between).
        if result[self._time_attr] < self._max_t and leaves_top(bracket, trial.trial_id):
            self._num_stopped += 1
            return TrialScheduler.STOP
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.CONTINUE and leaves_top(bracket, trial.trial_id):
            self._num_stopped += 1
            return TrialScheduler.STOP
        return action


def leaves_top(bracket, trial_id: str) -> bool:
    """Whether ``trial_id``'s value at the highest rung of ``bracket`` (a Ray ``_Bracket``: rungs highest
    first, values are rewards, higher is better) it has reached is now below that rung's cutoff over every
    trial recorded there, itself included."""
    for _, recorded in bracket._rungs:
        if trial_id in recorded:
            cutoff = bracket.cutoff(recorded) if len(recorded) > 1 else None
            return cutoff is not None and recorded[trial_id] < cutoff
    return False


def replay(scheduler_cls, curves: list[dict[int, float]], *, reduction_factor: int, grace_period: int, max_t: int,
           concurrent: int) -> dict[int, int]:
    """Run an ASHA scheduler's Tune hooks over known loss curves, as the Tune controller would: trials start in
    list order, ``concurrent`` at a time, all training at the same speed and reporting ``curves[i][step]``
    every ``grace_period`` steps; returns ``{trial index: steps trained}``. With the curves of an exhaustive
    sweep this prices a scheduler over many trial orders without training anything again."""
    from ray.tune.experiment import Trial

    sched = scheduler_cls(time_attr="step", metric="loss", mode="min", max_t=max_t, grace_period=grace_period,
                          reduction_factor=reduction_factor)
    trials = [Trial("__replay", stub=True) for _ in curves]
    pending, running, steps = list(range(len(curves))), {}, {}
    while pending or running:
        while len(running) < concurrent and pending:
            i = pending.pop(0)
            sched.on_trial_add(None, trials[i])
            running[i] = 0
        i = min(running, key=lambda j: (running[j], j))  # the trial furthest behind reports next
        running[i] = min(running[i] + grace_period, max_t)
        result = {"step": running[i], "loss": curves[i][running[i]]}
        if sched.on_trial_result(None, trials[i], result) == TrialScheduler.STOP:
            steps[i] = running.pop(i)
    return steps
