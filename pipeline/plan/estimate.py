"""The rows of a study's cost plan: one method per stage turns a job of the DAG into its
device-hours, peak memory and how they came, from the params, the split sizes and the
calibrator's timings; :func:`make_plan` collects them with their notes.

torch, and the kdiga modules that import it, are imported inside the functions that need
them: ``pipeline.status`` imports this package (for its :class:`~pipeline.plan.records.Plan`)
and reads no model.
"""

from __future__ import annotations

import dataclasses

import torch
from pyautoattack import AutoAttack

from kdiga.attacks.autoattack import _configure, canonical_aa_norm
from kdiga.bounds import table4
from kdiga.methods import get_method
from kdiga.signals import signals_nbytes
from kdiga.train import predict
from pipeline import dag
from pipeline.params import Study, parse_student_id
from pipeline.plan.calibrate import Calibrator
from pipeline.plan.records import Cost, Plan, Row
from pipeline.plan.render import fmt_bytes, fmt_s
from pipeline.plan.study import Sizes, default, model_spec, split_sizes
from pipeline.stages.attack import autoattack_settings
from pipeline.stages.common import train_config

#: the report stage is not calibrated: a nominal minute and half a GiB on the CPU
REPORT_S, REPORT_BYTES = 60.0, 2**29
MEMORY_BASIS = {
    True: "torch.cuda.max_memory_allocated over the timed calls",
    False: "ESTIMATED from parameter sizes and the activations autograd saves (not measured "
    "on the CPU)",
}
STAGES_ON_CPU = ("shard", "report")


def _at(c: Cost) -> str:
    return f" [timed at batch {c.batch}, scaled x{c.full / c.batch:.3g}]" if c.scaled else ""


class _Estimator:
    """The rows of one study: one method per stage, reading the params and the calibrator."""

    def __init__(self, params: Study, cal: Calibrator, sizes: Sizes) -> None:
        self.p, self.cal, self.sizes = params, cal, sizes
        a, b, s = params.attack, params.bounds, params.signals
        self.pass_batch = max(a.batch_size, b.batch_size, s.batch_size)
        self.eval_batch = _predict_batch()
        self.notes: list[str] = []
        d = params.data
        self.image_bytes = d["in_chans"] * d["image_size"] ** 2  # uint8 pixels
        self.memory = "measured" if cal.cuda else "estimate"

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def row(self, job: dag.Job) -> Row:
        seconds, peak, basis = getattr(self, job.stage)(job)
        on = "cpu" if job.stage in STAGES_ON_CPU else self.cal.device
        memory = (
            "nominal"
            if job.stage == "report"
            else ("estimate" if job.stage == "shard" else self.memory)
        )
        return Row(job.name, job.stage, on, seconds / 3600, int(peak), memory, basis)

    @property
    def held_train(self) -> float:
        """Bytes of the training split a training job holds: all of it in memory, none when
        it streams from shards (ImageNet)."""
        return 0.0 if self.p.shard.streamed else self.sizes.train * self.image_bytes

    def passes(self, model_id: str) -> Cost:
        return self.cal.passes(model_spec(self.p, model_id), self.pass_batch)

    # -- one method per stage ---------------------------------------------------------------

    def shard(self, job: dag.Job) -> tuple[float, float, str]:
        z = self.sizes
        total = z.train + z.val + z.test
        d = self.p.data
        c = self.cal.shard((d["in_chans"], d["image_size"], d["image_size"]))
        peak = (2 * (z.train + z.val) + z.test) * self.image_bytes  # loaded, then split
        if self.p.shard.streamed:  # image files copied into shards, one at a time
            peak = 2 * self.image_bytes
        if peak > 2**35:
            self.note(f"the shard stage holds every split in memory: about {fmt_bytes(peak)}")
        basis = f"{total:,} images written x {fmt_s(c.seconds)} (reading the dataset not counted)"
        return total * c.seconds, peak, basis

    def teacher(self, job: dag.Job) -> tuple[float, float, str]:
        name, z = job.key, self.sizes
        t, spec, p = self.p.teachers[name], model_spec(self.p, name), self.passes(name)
        evals = (z.val + z.test) * p.seconds
        if t.source != "train":
            basis = f"{t.source.split(':')[0]}: forward over {z.val + z.test:,} val and test images"
            return evals, p.forward_peak(self.eval_batch), basis
        tr = t.train
        settings = {"eps": tr.eps, "steps": tr.steps, "step_size": tr.step_size}
        if tr.method == "trades":
            settings["trades_beta"] = tr.trades_beta
        cfg = train_config(tr, tr.seed)
        c = self.cal.step(spec, tr.method, settings, cfg)
        spe = max(1, z.train // cfg.batch_size)
        seconds = tr.epochs * (spe * c.seconds + z.val * p.seconds) + evals
        peak = c.peak(cfg.batch_size) + self.held_train
        basis = (
            f"{tr.epochs} epochs x {spe:,} steps x {fmt_s(c.seconds)} ({tr.method}, "
            f"batch {cfg.batch_size}){_at(c)}"
        )
        return seconds, peak, basis

    def signals(self, job: dag.Job) -> tuple[float, float, str]:
        sig, n, p = self.p.signals, self.sizes.train, self.passes(job.key)
        d = self.p.data
        shape = (d["in_chans"], d["image_size"], d["image_size"])
        nbytes = signals_nbytes(sig.views, n, shape, d["num_classes"], sig.grad_dtype)
        if nbytes / 1e9 > sig.max_gb:
            self.note(
                f"{job.name} would be refused: its file of {nbytes / 1e9:,.1f} GB is over "
                f"signals.max_gb ({sig.max_gb:g})"
            )
        basis = (
            f"{sig.views} views x {n:,} images x fwd+bwd {fmt_s(p.grad_seconds)}; file and "
            f"host memory {nbytes / 1e9:,.2f} GB"
        )
        return sig.views * n * p.grad_seconds, p.peak(sig.batch_size), basis

    def distill(self, job: dag.Job) -> tuple[float, float, str]:
        sj, z = parse_student_id(self.p, job.key), self.sizes
        m = get_method(sj.method)
        settings = m.settings(self.p.value("distill"))
        cfg = train_config(self.p.train_settings(sj.student), sj.seed)
        spec, batch = model_spec(self.p, job.key), cfg.batch_size
        cached = dag.uses_signals(self.p, m.name)
        live = m.needs_teacher and not m.cacheable  # the teacher at x + delta: timed in the step
        t_spec = model_spec(self.p, sj.teacher) if live else None
        c = self.cal.step(
            spec, m.name, settings, cfg, teacher=t_spec, given_signals=m.needs_teacher and not live
        )
        per_step, extra, held = c.seconds, "", c.peak(batch)
        if m.needs_teacher and not live and not cached:
            tp = self.passes(sj.teacher)
            per_image = tp.grad_seconds if m.iga else tp.seconds
            per_step += batch * per_image
            extra = f" + teacher {'fwd+bwd' if m.iga else 'forward'} {fmt_s(batch * per_image)}"
            held = c.fixed_bytes + tp.fixed_bytes + max(c.item_bytes, tp.item_bytes) * batch
        elif cached:
            extra = " (cached teacher signals)"
        spe = max(1, z.train // batch)
        evals = z.val * self.passes(job.key).seconds
        seconds = cfg.epochs * (spe * per_step + evals)
        peak = held + self.held_train
        basis = (
            f"{cfg.epochs} epochs x {spe:,} steps x {fmt_s(c.seconds)}{extra} "
            f"(batch {batch}){_at(c)}"
        )
        return seconds, peak, basis

    def attack(self, job: dag.Job) -> tuple[float, float, str]:
        a, model, name = self.p.attack, job.args["model"], job.args["attack"]
        n = self.sizes.test if a.split == "test" else self.sizes.val
        radii, p = len(a.radii), self.passes(model)
        if name == "pgd":
            grads = n * radii * a.pgd.restarts * a.pgd.steps
            forwards = n * (1 + radii * (a.pgd.restarts + 1))
        else:
            g, f = autoattack_passes(self.p)
            grads, forwards = n * radii * g, n * (1 + radii * (f + 3))  # + clean predictions
        seconds = grads * p.grad_seconds + forwards * p.seconds
        basis = f"at most {grads:,} fwd+bwd and {forwards:,} forward passes of one image"
        return seconds, p.peak(a.batch_size), basis

    def bounds_teacher(self, job: dag.Job) -> tuple[float, float, str]:
        b, teacher = self.p.bounds, job.args["teacher"]
        n = min(b.samples, self.sizes.test)
        checked, radii = min(b.check_samples, n), len(b.radii)
        # its input gradient on every sample; its own ascent (every point kept) and PGD on
        # the checked ones
        grads = n + checked * radii * (b.restarts * b.steps + default(table4, "pgd_steps"))
        forwards = checked * radii * b.restarts
        p = self.passes(teacher)
        seconds = grads * p.grad_seconds + forwards * p.seconds
        basis = f"at most {grads:,} fwd+bwd and {forwards:,} forward passes of one image"
        return seconds, p.peak(b.batch_size), basis

    def bounds(self, job: dag.Job) -> tuple[float, float, str]:
        b, sid = self.p.bounds, job.args["model"]
        teacher = dag.bounds_teacher(self.p, sid, job.args.get("teacher"))
        n = min(b.samples, self.sizes.test)
        checked, radii = min(b.check_samples, n), len(b.radii)
        steps = b.restarts * b.steps  # gradient steps of one model's ascent, at most
        evals = b.restarts * (b.steps + 1)  # the points it evaluates, at most
        pgd = default(table4, "pgd_steps")
        tested = 2 + default(table4, "random_points")  # PGD points of both models, random ones
        # the student's ascent on every sample and PGD on the checked ones; there each model
        # is evaluated at the other's ascent points (the teacher's from its bounds_teacher
        # job) and both at the tested points
        s_grads = n * (1 + radii * steps) + checked * radii * pgd
        s_fwd = n * radii * b.restarts + checked * radii * (evals + tested)
        t_fwd = checked * radii * (evals + tested)
        forwards = s_fwd + t_fwd
        ps, pt = self.passes(sid), self.passes(teacher)
        seconds = s_grads * ps.grad_seconds + s_fwd * ps.seconds + t_fwd * pt.seconds
        peak = ps.fixed_bytes + pt.fixed_bytes + max(ps.item_bytes, pt.item_bytes) * b.batch_size
        basis = f"at most {s_grads:,} student fwd+bwd, {forwards:,} forward passes of one image"
        return seconds, peak, basis

    def report(self, job: dag.Job) -> tuple[float, float, str]:
        return REPORT_S, REPORT_BYTES, "nominal: reads the results, draws one figure"


def _predict_batch() -> int:
    return default(predict, "batch_size")


def autoattack_passes(params: Study) -> tuple[int, int]:
    """(forward + backward, forward) passes per image and radius of the params' AutoAttack,
    when every point survives every attack: its attacks as ``kdiga.attacks.autoattack``
    configures them (version, restarts, iterations, target classes, Square's queries)."""
    kw = autoattack_settings(params.attack.autoattack)
    classes = params.shard.info.classes
    adv = AutoAttack(
        torch.nn.Identity(),
        attacks=kw.get("attacks"),
        device="cpu",
        eps=0.1,
        norm=canonical_aa_norm(params.attack.norm),
        seed=0,
        version=kw["version"],
    )
    _configure(
        adv, classes, kw.get("n_iter"), None, kw.get("n_restarts"), kw.get("n_target_classes")
    )
    apgd, apgd_t, fab, square = adv.apgd, adv.apgd_targeted, adv.fab, adv.square
    grads = {
        "apgd-ce": apgd.n_restarts * apgd.n_iter * apgd.eot_iter,
        "apgd-dlr": apgd.n_restarts * apgd.n_iter * apgd.eot_iter,
        "apgd-t": apgd_t.n_target_classes * apgd_t.n_restarts * apgd_t.n_iter * apgd_t.eot_iter,
        "fab": fab.n_restarts * fab.n_iter * classes,  # a backward per class per iteration
        "fab-t": fab.n_target_classes * fab.n_iter,
        "square": 0,
    }
    forwards = {"square": square.n_queries * square.n_restarts}
    run = adv.attacks_to_run
    return sum(grads[a] for a in run), sum(forwards.get(a, 0) for a in run)


def make_plan(params: Study, cal: Calibrator, path: str = "params.yaml") -> Plan:
    """The cost plan of validated ``params``: one row per job of :func:`pipeline.dag.jobs`."""
    sizes = split_sizes(params)
    est = _Estimator(params, cal, sizes)
    start = cal.seconds
    rows = [est.row(job) for job in dag.jobs(params)]
    notes = est.notes
    if any(c.scaled for c in cal.costs.values()):
        notes.append(
            "[timed at batch b, scaled xk]: a step at the full batch would exceed "
            f"{cal.budget:g} s here, so a smaller batch was timed and its time "
            "multiplied by k"
        )
    notes += [
        f"split sizes from {sizes.source}: {sizes.train:,} train, {sizes.val:,} val, "
        f"{sizes.test:,} test images",
        "attack and bounds rows are upper bounds: every point attacked at every radius, "
        "for every step and restart",
        f"peak memory: {MEMORY_BASIS[cal.cuda]}; "
        + (
            "training streams its batches from the shards"
            if params.shard.streamed
            else "training jobs include their training split, held on the device"
        ),
    ]
    return Plan(
        params=path,
        device=cal.device,
        threads=torch.get_num_threads(),
        clock=cal.clock,
        calibrate_steps=cal.steps,
        calibration_s=cal.seconds - start,
        sizes=dataclasses.asdict(sizes),
        rows=rows,
        costs=list(cal.costs.values()),
        notes=notes,
    )
