"""The one trainer: Accelerate-driven optimisation of any `Method` (MAE, DINO, supervised) on a ShardStream.

It never asks which method it runs (see methods/base.py for the contract). Schedules are pure functions of the
global step; the data stream position, the resolved recipe, the seed and the code version go into every checkpoint,
so `--resume` continues exactly (same per-step losses as an uninterrupted run on CPU with the same process count).
"""
import contextlib
import json
import math
from pathlib import Path

import torch
from torch import nn
from accelerate import Accelerator
from accelerate.utils import set_seed

from ssl_vit.atomic_io import write_json_atomic, write_text_atomic
from ssl_vit.config import Recipe, check_world, epoch_settings, method_settings
from ssl_vit.data.loader import StreamLoader
from ssl_vit.data.sources import expand_source
from ssl_vit.data.stream import ShardStream
from ssl_vit.errors import SslVitError, load_error_detail
from ssl_vit.eval.monitor import knn_monitor
from ssl_vit.methods import backbone_spec, build_method
from ssl_vit.models.export import export_backbone
from ssl_vit.schedules import cosine
from ssl_vit.seeding import step_seed
from ssl_vit.train.best import BestBackbone
from ssl_vit.train.checkpoint import (architecture_differences, code_version, find_checkpoint,
                                     read_checkpoint_meta, save_checkpoint)
from ssl_vit.train.fetcher import StepFetcher
from ssl_vit.train.preemption import PreemptionWatch
from ssl_vit.train.run_log import RunLog, tracking_options
from ssl_vit.train.step_timer import StepTimer
from ssl_vit.threads import use_threads
from ssl_vit.transforms import MultiViewTransform, resolve_decode, views_from_recipe
from ssl_vit.transforms.presets import global_view_count


def resolve_precision(value: str) -> str:
    if value == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return value


def trainer_schedules(recipe: Recipe, total_steps: int, spe: int, lr_scale_batch: int) -> dict:
    o = recipe.optim
    peak = o.base_lr * lr_scale_batch / 256
    warmup = round(o.warmup_epochs * spe)
    wd_end = o.weight_decay if o.weight_decay_end < 0 else o.weight_decay_end
    return {"lr": lambda s: cosine(s, total_steps, peak, o.min_lr, warmup_steps=warmup),
            "wd": lambda s: cosine(s, total_steps, o.weight_decay, wd_end)}


def epoch_length(r: Recipe, shards) -> int:
    """Optimizer steps per epoch: from the shards' sample counts, or `data.samples_per_epoch`. Without either, an
    epoch is unknown and every setting counted in epochs is an error (it would silently stretch to the whole run)."""
    if r.data.samples_per_epoch and shards.num_samples not in (None, r.data.samples_per_epoch):
        raise SslVitError(f"data.samples_per_epoch={r.data.samples_per_epoch}, but the shards' index counts "
                          f"{shards.num_samples} samples: leave data.samples_per_epoch at 0 for indexed shards")
    samples = r.data.samples_per_epoch or shards.num_samples
    if samples is None:
        settings = epoch_settings(r)
        if settings:
            key = next(iter(settings))
            raise SslVitError(f"{key}={settings[key]:g} counts epochs, but these shards have no sample counts: write "
                              "an index (ssl-vit shards index PATTERN --out INDEX.json) and train from it, or set "
                              f"data.samples_per_epoch (or set {', '.join(settings)} to 0 and use train.steps)")
        return 0
    spe = samples // r.data.batch_size
    if spe < 1:
        raise SslVitError(f"data.batch_size: {r.data.batch_size} is more than the {samples} samples of an epoch")
    return spe


class Trainer:
    def __init__(self, recipe: Recipe, accelerator: Accelerator | None = None, build=build_method):
        """`build(recipe, num_classes=, num_global_views=)` makes the method: the registry's `build_method` (fresh
        weights), or `ssl_vit.loading.method_from_recipe` from callers whose recipe reads weights from disk
        (model.init, supervised.distill.teacher): the trainer itself never reads a model from disk."""
        self.recipe = r = recipe
        if r.model.init and build is build_method:
            raise SslVitError("model.init: this caller trains from fresh weights only; fine-tune through "
                              "`ssl-vit finetune` (or pass build=ssl_vit.loading.method_from_recipe)")
        self.acc = accelerator or Accelerator(mixed_precision=resolve_precision(r.train.mixed_precision),
                                              **tracking_options(r.train.log_with, r.train.out_dir))
        set_seed(r.seed)
        self.threads = use_threads(r.data.num_workers, r.train.threads)  # the cores the loader's workers leave
        self.out_dir = Path(r.train.out_dir)
        self.micro_batch = check_world(r, self.acc.num_processes)
        specs = views_from_recipe(r.views)
        shards = expand_source(r.data.train)
        self.classes = shards.classes or []
        if method_settings(r).needs_labels and shards.unlabeled_sources:
            raise SslVitError(f"{shards.unlabeled_sources[0]} holds unlabeled samples: supervised training and "
                              "fine-tuning need labeled shards (MAE and DINO pretrain on unlabeled ones)")
        self.spe = epoch_length(r, shards)
        self.total_steps = r.train.steps or math.ceil(r.train.epochs * self.spe)
        num_classes = r.data.num_classes or len(self.classes)
        method = build(r, num_classes=num_classes, num_global_views=global_view_count(specs))
        # Every process starts from the same weights, then draws its own drop-path masks and the like.
        set_seed(r.seed + self.acc.process_index)
        if self.acc.num_processes > 1 and self.acc.device.type == "cuda":
            # BatchNorm (DINO's optional head BN) normalises over the global batch, as the reference does; torch's
            # SyncBatchNorm runs on GPUs only, so CPU processes keep per-process statistics.
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        groups = method.param_groups(r.optim.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=r.optim.base_lr, betas=tuple(r.optim.betas))
        self.model, self.optimizer = self.acc.prepare(method, optimizer)
        self.method = self.acc.unwrap_model(self.model)
        self.schedules = {**trainer_schedules(r, self.total_steps, self.spe, r.data.batch_size),
                          **self.method.schedules(self.total_steps, self.spe)}
        transform = MultiViewTransform(specs, resolve_decode(r.data.decode, self.acc.device, specs))
        self.stream = ShardStream(shards, transform, self.micro_batch, mode="train", seed=r.seed,
                                  shuffle_buffer=r.data.shuffle_buffer, rank=self.acc.process_index,
                                  world_size=self.acc.num_processes, max_skip_fraction=r.data.max_skip_fraction,
                                  num_workers=r.data.num_workers, require_labels=method_settings(r).needs_labels,
                                  batches_per_epoch=self.spe * r.optim.accum_steps)
        self.step, self.skipped_steps, self.images_seen, self.train_seconds = 0, 0, 0, 0.0
        self.best, self.monitored_step, self.last_score = BestBackbone(), None, None
        self._maybe_resume()
        self.loader = StreamLoader(self.stream, device=self.acc.device)
        self.monitor = knn_monitor(r) if r.train.monitor_every and self.acc.is_main_process else None

    # -- checkpoints ------------------------------------------------------------------------------------------
    def _maybe_resume(self) -> None:
        path = find_checkpoint(self.out_dir, self.recipe.train.resume)
        if path is None:
            return
        trainer_state, stream_states = read_checkpoint_meta(path)
        stored_batch = trainer_state["recipe"]["data"]["batch_size"]
        if stored_batch != self.recipe.data.batch_size:
            raise SslVitError(f"checkpoint {path} was trained with data.batch_size={stored_batch}; resume with the "
                              f"same global batch (now {self.recipe.data.batch_size}; the processes, workers and "
                              "accumulation steps may change)")
        differences = architecture_differences(trainer_state["recipe"], self.recipe.to_dict())
        if differences:
            raise SslVitError(f"checkpoint {path} does not match this recipe's model: {'; '.join(differences)}")
        try:
            self.acc.load_state(str(path))
        except (RuntimeError, KeyError, ValueError) as e:
            raise SslVitError(f"checkpoint {path} does not match this recipe's model/optimizer: "
                              f"{load_error_detail(e)}") from None
        self.step = trainer_state["step"]
        self.skipped_steps = trainer_state.get("skipped_steps", 0)
        self.images_seen = trainer_state.get("images_seen", 0)
        self.train_seconds = trainer_state.get("train_seconds", 0.0)
        self.best = BestBackbone.read(trainer_state.get("best"), path, load_state=self.acc.is_main_process)
        self.stream.resume_from([state["stream"] for state in stream_states], self.step * self.recipe.optim.accum_steps,
                                skip_counts=[state.get("skip_counts", [0, 0]) for state in stream_states])
        if self.acc.is_main_process:
            print(f"resumed from {path} at step {self.step}")

    def stream_state(self) -> dict:
        """The stream position and skip counts after the batches consumed so far: what a checkpoint stores."""
        return {"stream": self.loader.state.to_dict(), "skip_counts": list(self.loader.skip_counts())}

    def save(self, stream_state: dict | None = None) -> Path:
        """A checkpoint of the steps done; `stream_state` (default: the current one) is where the data continues."""
        trainer_state = {"step": self.step, "seed": self.recipe.seed, "recipe": self.recipe.to_dict(),
                         "code_version": code_version(), "world_size": self.acc.num_processes,
                         "skipped_steps": self.skipped_steps, "images_seen": self.images_seen,
                         "train_seconds": self.train_seconds, "classes": self.classes, "best": self.best.to_dict()}
        stream_state = stream_state or self.stream_state()
        return save_checkpoint(self.acc, self.out_dir / "checkpoints", self.step, trainer_state, stream_state,
                               keep=self.recipe.train.keep_checkpoints, write_main=self.best.write)

    # -- the loop ---------------------------------------------------------------------------------------------
    def _apply_schedules(self) -> dict:
        sched = {name: float(f(self.step)) for name, f in self.schedules.items()}
        for group in self.optimizer.param_groups:
            group["lr"] = sched["lr"] * group.get("lr_scale", 1.0)
            group["weight_decay"] = sched["wd"] * group.get("wd_scale", 1.0)
        return sched

    def _train_step(self, batches, sched: dict) -> tuple[dict, str | None]:
        """One optimizer step over `accum_steps` micro-batches; returns (logs, what was not finite on some process:
        None, "loss" or "gradient norm"). A step with either not finite leaves the weights, the optimizer and the
        EMA teacher as they were."""
        accum = self.recipe.optim.accum_steps
        totals: dict[str, float] = {}
        with self.acc.autocast():
            batches = self.method.prepare_step(batches, sched)
        for i, batch in enumerate(batches):
            sync = contextlib.nullcontext() if i == accum - 1 else self.acc.no_sync(self.model)
            with sync, self.acc.autocast():
                out = self.model(batch, sched, seed=step_seed(self.recipe.seed, self.step, self.acc.process_index, i))
                self.acc.backward(out["loss"] / accum)
            for name, value in out.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach() if torch.is_tensor(value) else value) / accum
        self.method.before_optimizer_step(self.step, sched)
        totals["grad_norm"] = self._grad_norm()
        images = sum(len(batch["views"][0]) for batch in batches)  # short where the device path dropped one
        problem, totals["images"] = self._agreed_problem(totals["loss"], totals["grad_norm"], images)
        if problem is None:
            self.optimizer.step()
            self.method.on_step_end(self.step, sched)
        self.optimizer.zero_grad(set_to_none=True)
        return totals, problem

    def _grad_norm(self) -> float:
        """The gradients' global L2 norm, computed once per step: clipped to `optim.clip_grad` when it is set, else
        measured only (clipping at infinity scales by 1). accelerate unscales fp16 gradients first."""
        clip = self.recipe.optim.clip_grad
        return float(self.acc.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf))

    def _agreed_problem(self, loss: float, grad_norm: float, images: int) -> tuple[str | None, int]:
        """(what is not finite on any process: "loss", "gradient norm" or None; the images this step trained on over
        every process), the same answer on every process (one all-reduce), so that all skip or stop together. Under
        fp16 an overflowing gradient is the GradScaler's business: it skips that update itself and lowers its
        scale."""
        grads_ok = math.isfinite(grad_norm) or self.acc.scaler is not None
        flags = torch.tensor([float(math.isfinite(loss)), float(grads_ok), float(images)], device=self.acc.device)
        loss_ok, grads_ok, images = self.acc.reduce(flags, reduction="sum").tolist()
        loss_ok, grads_ok = loss_ok == self.acc.num_processes, grads_ok == self.acc.num_processes
        return (None if loss_ok and grads_ok else "loss" if not loss_ok else "gradient norm"), int(images)

    def _handle_nonfinite(self, problem: str, logs: dict, last_ckpt: Path | None) -> None:
        what = f"non-finite {problem} (loss {logs['loss']}, gradient norm {logs['grad_norm']})"
        if self.recipe.train.on_nonfinite == "skip":
            self.skipped_steps += 1
            self.acc.print(f"warning: {what} at step {self.step}: update skipped ({self.skipped_steps} so far)")
            return
        where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
        raise SslVitError(f"{what} at step {self.step}; run stopped ({where})")

    def _logs_at(self, step: int) -> bool:
        """Whether the log gets a line after `step` steps (every train.log_every, every monitor step, the last)."""
        every = self.recipe.train.monitor_every
        return step % self.recipe.train.log_every == 0 or step == self.total_steps or bool(every and step % every == 0)

    def _open_audit(self):
        folder = self.out_dir / "audit"
        folder.mkdir(parents=True, exist_ok=True)
        return open(folder / f"rank{self.acc.process_index}.jsonl", "a")

    def fit(self) -> dict:
        """Train to the end and export; on SIGTERM/SIGUSR1, checkpoint and raise `Preempted` (train/preemption.py)."""
        with PreemptionWatch(self.acc) as preempt:
            return self._fit(preempt)

    def _fit(self, preempt: PreemptionWatch) -> dict:
        r, acc = self.recipe, self.acc
        if acc.is_main_process:
            truncate_log(self.out_dir / "log.jsonl", self.step)
        log = RunLog(acc, self.out_dir, r.to_dict(), self.total_steps, self.step, r.train.progress,
                     desc=f"{r.method} pretrain")
        accum, last_ckpt, stopped_at = r.optim.accum_steps, None, None
        fetch = StepFetcher(self.loader, preempt.signals, acc.device)
        timer = StepTimer(acc.device)
        audit = self._open_audit() if r.train.audit_keys else None
        try:
            while self.step < self.total_steps:
                timer.start(exact=self._logs_at(self.step + 1))  # the device drained only at logged steps
                sched = self._apply_schedules()
                before = self.stream_state()  # where the data continues if this step does not happen
                batches = fetch.batches(accum, preempt.signalled)  # None: signalled before or while waiting
                timer.data_ready()
                if preempt.stop_agreed():  # every rank has its batches, or gave up on them
                    stopped_at = before
                    break
                if audit is not None:
                    audit.write(json.dumps({"step": self.step, "keys": [k for b in batches for k in b["key"]]}) + "\n")
                logs, problem = self._train_step(batches, sched)
                if problem is not None:
                    self._handle_nonfinite(problem, logs, last_ckpt)
                dt, t_data = timer.stop()
                self.step += 1
                self.images_seen += logs.pop("images")
                self.train_seconds += dt
                ips = r.data.batch_size / dt
                log.step(logs["loss"], ips)
                watch = bool(r.train.monitor_every) and self.step % r.train.monitor_every == 0
                if self._logs_at(self.step):
                    loss = acc.reduce(torch.tensor(logs["loss"], device=acc.device), reduction="mean").item()
                    seen, skipped = self.loader.skip_counts()
                    log.write(self.step, {**logs, "loss": loss, **{k: v for k, v in sched.items()},
                                          "images_per_s": ips, "data_wait_frac": t_data / dt,
                                          "epoch": self.step / self.spe if self.spe else None,
                                          "skipped_samples": skipped, "skipped_steps": self.skipped_steps,
                                          "threads": self.threads["threads"],
                                          **self.loader.decode_counts(),
                                          **(self._monitor() if watch else {})})
                if r.train.checkpoint_every and self.step % r.train.checkpoint_every == 0:
                    last_ckpt = self.save()
        finally:
            fetch.close()  # ends the DataLoader workers now, not whenever the garbage collector gets to them
            log.close()
            if audit is not None:
                audit.close()
        if last_ckpt is None or not last_ckpt.name.endswith(f"{self.step:08d}"):
            last_ckpt = self.save(stopped_at)
        if self.step < self.total_steps:
            raise preempt.stopped(self.step, last_ckpt)
        return self.finish()

    def _monitor(self) -> dict:
        """k-NN of the current backbone on data.monitor (eval/monitor.py): the main process scores, the rest wait."""
        with self.acc.autocast():
            values = self.monitor(self.method.backbone(), self.acc.device) if self.monitor else {}
        self.monitored_step = self.step  # on every process: the processes decide alike whether to score again
        if values:
            self.last_score = values["monitor_knn_top1"]
            if self.recipe.train.keep_best:
                self.best.consider(self.step, values["monitor_knn_top1"], self.method.backbone())
        self.acc.wait_for_everyone()
        return values

    def _keep_best(self) -> dict:
        """train.keep_best: the last step scored too (when it was not a monitored one), then the best step's weights
        put back into the backbone about to be exported (main process)."""
        if self.monitored_step != self.step:
            self._monitor()
        if self.acc.is_main_process and self.best.step != self.step:
            self.best.restore_into(self.method.backbone())
        return {"by": "monitor_knn_top1", "step": self.best.step, "monitor_knn_top1": self.best.score,
                "last_step": self.step, "last_monitor_knn_top1": self.last_score}

    def finish(self) -> dict:
        summary = {"method": self.recipe.method, "steps": self.step, "images_seen": self.images_seen,
                   "train_seconds": round(self.train_seconds, 2),
                   "images_per_s": round(self.images_seen / max(self.train_seconds, 1e-9), 1),
                   "skipped_steps": self.skipped_steps, "world_size": self.acc.num_processes,
                   "backbone": str(self.out_dir / "backbone.safetensors")}
        if self.recipe.train.keep_best:
            summary["kept"] = self._keep_best()
        if self.acc.is_main_process:
            spec = backbone_spec(self.recipe)
            export_backbone(self.method.backbone(), spec, self.out_dir / "backbone.safetensors",
                            extra_meta={"method": self.recipe.method, "classes": self.classes,
                                        "step": summary["kept"]["step"] if "kept" in summary else self.step,
                                        "code_version": code_version()})
            write_json_atomic(self.out_dir / "summary.json", summary)
        self.acc.wait_for_everyone()
        return summary


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint so the log reads like one uninterrupted run."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
