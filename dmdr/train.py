"""The DMDR trainer: distribution matching distillation + reward fine-tuning of a few-step
SDXL generator. Read top to bottom: ``Trainer.__init__`` sets up, ``fit`` is the loop,
``guidance_step`` and ``generator_step`` are the two updates of the two time-scale rule.
"""
from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object, set_seed

from dmdr import components, data, fsdp, inference, plot
from dmdr.checkpoint import Checkpointer
from dmdr.config import TrainConfig, save_args
from dmdr.dmd import losses, sampler, timesteps as ts
from dmdr.logs import JsonlLog, Progress, peak_gpu_memory_gib, setup_logging
from dmdr.models import sdxl
from dmdr.errors import UserError
from dmdr.rewards import RewardSet, RewardSpec, check_reward_file
from dmdr.run_storage import RunStorage
from dmdr.tracking import Tracking

# Pod eviction and Ctrl-C both stop cleanly with 128 + the signal: 143 after SIGTERM is retryable
# for the training operator, unlike 0 (job done).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FINAL_UPLOAD_TIMEOUT = 1800.0


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.acc, self.acc_gui = components.make_accelerators(cfg)
        acc = self.acc
        self.device = acc.device
        self.storage = RunStorage(cfg, self.run_dir, acc)  # preflight: an unreachable store fails now
        self.agreed_step = self.storage.restore()  # all nodes settle a step; a fresh pod pulls it and its logs
        self.log = setup_logging(self.run_dir, acc.is_main_process, acc.process_index)
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
            torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
        if acc.is_main_process:
            save_args(cfg, self.run_dir / "args.json")
        self.log.info(f"run directory: {self.run_dir}")
        self.tracking = Tracking(acc, cfg, synced_to=self.storage.remote if self.storage.enabled else None)

        # Rewards: check the files now, load them only when the reward phase starts.
        specs = []
        for name, path, arch, weight, prefix in (
            ("clip", cfg.clip_reward_model, cfg.clip_reward_arch, cfg.reward_clip_weight, None),
            ("hps", cfg.hpsv2_reward_model, cfg.hps_reward_arch, cfg.reward_hps_weight, cfg.magic_prompt),
        ):
            if path:
                spec = RewardSpec(name=name, path=components.resolve_input_file(path, f"--{name} reward model"),
                                  arch=arch, weight=weight, prefix=prefix)
                check_reward_file(spec)
                specs.append(spec)
        self.rewards = RewardSet(specs) if specs else None

        set_seed(cfg.seed)  # identical model init on every rank
        with acc.local_main_process_first():  # one download/build per node, then the others read it
            self.models = components.build_models(cfg, self.device)
        m = self.models
        self.alphas = m.parts.alphas_cumprod
        self.grid = ts.generator_timesteps(cfg.sample_num_steps, cfg.shift, cfg.conditioning_timestep,
                                           steps=cfg.generator_timesteps)
        if cfg.sample_num_steps == 1 and cfg.s_type_gui != "uniform":
            # The reference meant to force this for one step but wrote a no-op comparison.
            self.log.warning("one-step training: --s-type-gui forced to uniform (as the reference intends)")
            self.s_type_gui = "uniform"
        else:
            self.s_type_gui = cfg.s_type_gui

        self.prepare_models(m.generator, m.guidance)

        # Data: one local batch per inner step, deterministic and resumable.
        prompts_path = data_path(cfg.data_path_train)
        self.stream = data.PromptStream(data.PromptFile(prompts_path), cfg.batch_size, acc.process_index,
                                        acc.num_processes, cfg.seed, num_workers=cfg.num_workers)
        self.neg = self.encode([""])
        self.sample_prompts = self._sample_prompts()

        self.global_step = 0  # generator updates
        self.inner_step = 0  # guidance updates
        self.ckpt = Checkpointer(self.run_dir, self.acc, self.acc_gui, keep_last=cfg.keep_last,
                                 protected=self.storage.uploading, sharded=self.sharded)
        self.gen_log = JsonlLog(self.run_dir / "loss_logs" / "loss_gen_log.jsonl", key="step")
        self.gui_log = JsonlLog(self.run_dir / "loss_logs" / "loss_gui_log.jsonl", key="inner_step")
        set_seed(cfg.seed + acc.process_index)  # different noise per rank
        resumed = self.resume()
        self.storage.start(resumed)
        self.stop_signal: int | None = None
        self.stop_time: float | None = None  # when this rank got it (time.monotonic)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_sigterm)

    def prepare_models(self, generator: torch.nn.Module, guidance: torch.nn.Module) -> None:
        """Optimisers, LR schedulers and the accelerators' wrapping of both models."""
        cfg = self.cfg
        if cfg.distributed == "fsdp":  # sharded first: the optimisers must hold the sharded parameters
            generator, guidance = fsdp.shard(generator, cfg.mixed_precision), fsdp.shard(guidance, cfg.mixed_precision)
        opt_gen = components.make_optimizer(cfg, components.trainable(generator), cfg.learning_rate_gen, cfg.adam_weight_decay)
        opt_gui = components.make_optimizer(cfg, components.trainable(guidance), cfg.learning_rate_gui, 0.0)
        components.register_adapter_hooks(self.acc, skip_weights=cfg.use_lora_gen)
        components.register_adapter_hooks(self.acc_gui, skip_weights=True)
        self.gen, self.opt_gen, self.sched_gen = fsdp.prepare(self.acc, generator, opt_gen, components.make_scheduler(cfg, opt_gen))
        self.gui, self.opt_gui, self.sched_gui = fsdp.prepare(self.acc_gui, guidance, opt_gui, components.make_scheduler(cfg, opt_gui))
        self.sharded = fsdp.ShardedState(self.acc, self.gen, self.opt_gen, self.acc_gui, self.gui, self.opt_gui,
                                         lora_gen=cfg.use_lora_gen) if cfg.distributed == "fsdp" else None

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return sdxl.encode_prompts(self.models.parts, prompts, self.device)

    # --- the loop ------------------------------------------------------------------------
    def fit(self) -> int:
        cfg, acc = self.cfg, self.acc
        self.log.info(
            f"training {cfg.max_train_steps} generator steps from step {self.global_step}: "
            f"{acc.num_processes} processes x batch {cfg.batch_size} x accumulation "
            f"{cfg.gradient_accumulation_steps} = {self.global_batch} prompts per step; "
            f"lr_gen {self.sched_gen.get_last_lr()[0]:g}, lr_gui {self.sched_gui.get_last_lr()[0]:g}"
        )
        progress = Progress(cfg.max_train_steps, self.global_step, self.global_batch)
        last_saved = self.global_step
        while self.global_step < cfg.max_train_steps:
            if self.stop_requested():
                return self.shutdown(saved=last_saved == self.global_step)
            batches = [self.prepare_batch(self.stream.next_batch()) for _ in range(cfg.gradient_accumulation_steps)]
            gui_logs, gen_logs = self.train_step(batches)
            self.write_gui_log(gui_logs)
            self.inner_step += 1
            if gen_logs is None:
                continue
            self.global_step += 1
            if self.global_step % cfg.sample_steps == 0:
                gen_logs.update(self.sample_grid())
            self.write_gen_log(gen_logs, progress)
            if self.global_step % cfg.sample_steps == 0 and acc.is_main_process:
                plot.plot_in_run(self.run_dir, self.storage.file_written, self.log)
            if self.global_step % cfg.checkpoint_steps == 0:
                self.save()
                last_saved = self.global_step
        if last_saved != self.global_step:
            self.save()
        self.check_replicas()
        acc.wait_for_everyone()
        if not self.storage.close_node_0_last(FINAL_UPLOAD_TIMEOUT, stop=self.stop_seen):
            if self.stop_seen():
                return self.exit_status()
            raise UserError(f"uploads to {cfg.s3_uri} did not finish in {FINAL_UPLOAD_TIMEOUT:.0f}s; "
                            f"{self.run_dir} has everything: rerun with --resume-ckpt auto once the store is back")
        self.log.info(f"training done at step {self.global_step}; outputs in {self.run_dir}")
        # No rank exits 0 before every rank's final upload is in the store: an elastic job is
        # Succeeded at the first pod that exits 0 and the operator then deletes the others
        # (torchrun's own exit barrier gives up after 300 s; this one waits as long as the upload).
        acc.wait_for_everyone()
        acc.end_training()
        return 0

    # --- shutdown on SIGTERM (pod eviction, kubectl delete) --------------------------------
    def _on_sigterm(self, signum, frame) -> None:
        self.stop_signal = signum
        self.stop_time = time.monotonic()

    def stop_seen(self) -> bool:
        """This rank got a stop signal (no collective: safe inside waits of one rank)."""
        return self.stop_signal is not None

    def exit_status(self) -> int:
        sig = signal.Signals(self.stop_signal or signal.SIGTERM)  # another rank's signal: SIGTERM
        self.log.warning(f"{sig.name}: exiting with status {128 + sig}; resume with --resume-ckpt auto")
        return 128 + sig

    def stop_requested(self) -> bool:
        """Every rank stops at the same step: a signal seen by any rank counts for all."""
        flag = torch.tensor([1.0 if self.stop_signal else 0.0, 1.0 if self.storage.lost else 0.0], device=self.device)
        if self.acc.num_processes > 1:
            flag = self.acc.reduce(flag, reduction="sum")
        if flag[1] > 0:  # another job took the run over (its lease): stop at once, write nothing more
            raise UserError(self.storage.lost or "another job took this run over: see rank 0's log")
        return bool(flag[0].item() > 0)

    def shutdown(self, saved: bool) -> int:
        cfg = self.cfg
        name = signal.Signals(self.stop_signal or signal.SIGTERM).name
        self.log.warning(f"{name} received: stopping at generator step {self.global_step}")
        if cfg.checkpoint_on_sigterm and not saved:
            self.save()
        # the grace counts from the signal: the step and the save before this took part of it
        grace = max(1.0, cfg.shutdown_grace - (time.monotonic() - self.stop_time if self.stop_time else 0.0))
        self.tracking.finish()
        flushed = self.storage.close(timeout=grace)
        if self.storage.enabled:
            self.log.warning(f"{name}: pending uploads " + ("flushed" if flushed else
                             f"NOT all flushed within {cfg.shutdown_grace:.0f}s (--shutdown-grace)"))
        return self.exit_status()

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.acc.num_processes * self.cfg.gradient_accumulation_steps

    def train_step(self, batches: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """One inner step on --gradient-accumulation-steps micro-batches: the guidance update over
        all of them, then, when due, the generator update over all of them (against the updated
        fake score), so G micro-batches of B make the updates of one batch of G*B. Logs are the
        means over the micro-batches."""
        gui_logs = mean_logs([self.accumulated(self.acc_gui, self.gui, self.guidance_step, b) for b in batches])
        if not (self.inner_step % self.cfg.ratio_update == 0 and self.inner_step > 0):
            return gui_logs, None
        return gui_logs, mean_logs([self.accumulated(self.acc, self.gen, self.generator_step, b) for b in batches])

    @staticmethod
    def accumulated(acc, model, step, batch: dict[str, Any]) -> dict[str, Any]:
        """`step(batch)` as one micro-batch of `model`'s accumulation: it steps at the G-th."""
        with acc.accumulate(model):
            return step(batch)

    def prepare_batch(self, prompts: list[str]) -> dict[str, Any]:
        """Text conditioning, the generator's own few-step chain (no grad), its inputs, and every
        random draw of the two updates (so a batch fixes the step; a micro-batch is a slice of it)."""
        cfg = self.cfg
        embeds = self.encode(prompts)
        shape = (len(prompts), 4, cfg.resolution // 8, cfg.resolution // 8)
        with torch.no_grad(), self.acc.autocast():
            self.gen.eval()
            all_x0, step_t = sampler.backward_simulation(
                lambda x, t: self.eps(self.gen, x, t, embeds), torch.randn(shape, device=self.device),
                self.grid, self.alphas)
        t_gen = ts.sample_discrete(len(prompts), step_t, cfg.s_type_gen, cfg.gen_a, cfg.gen_b,
                                   self.global_step, cfg.dynamic_step).to(self.device)
        x_clean = sampler.pick_x0(all_x0, step_t, t_gen).float()
        x_gen = sampler.generator_input(all_x0, step_t, t_gen, self.alphas).float()
        n = len(prompts)
        return {"prompts": prompts, "embeds": embeds, "x_clean": x_clean, "x_gen": x_gen, "t_gen": t_gen,
                "t_fit": self.score_timesteps(n, cfg.gui_fit_a, cfg.gui_fit_b), "noise_fit": torch.randn_like(x_clean),
                "t_dmd": self.score_timesteps(n, cfg.gui_a, cfg.gui_b), "noise_dmd": torch.randn_like(x_clean),
                "cfg_f": ts.cfg_scale(cfg.cfg_f), "cfg_r": ts.cfg_scale(cfg.cfg_r)}

    def eps(self, unet, x, t, embeds, **kw) -> torch.Tensor:
        return sdxl.predict_eps(unet, x, t, embeds[0], embeds[1], self.cfg.resolution, **kw)

    def guidance_step(self, b: dict[str, Any]) -> dict[str, float]:
        """Fit the fake score (the guidance LoRA at scale --lora-scale-f) to the generator's outputs."""
        self.gui.train()
        t, noise = b["t_fit"], b["noise_fit"]
        x_t = sampler.add_noise(b["x_clean"], noise, t, self.alphas)
        with self.acc_gui.autocast():
            eps = self.eps(self.gui, x_t, t, b["embeds"], lora_scale=self.cfg.lora_scale_f)
            loss = losses.guidance_loss(eps.float(), noise)
        lr = self.update(self.acc_gui, self.gui, self.opt_gui, self.sched_gui, loss)
        return {"loss_gui": loss.detach(), "lr_gui": lr}

    def generator_step(self, b: dict[str, Any]) -> dict[str, Any]:
        """DMD loss (real minus fake score, both with CFG) plus reward hinge losses."""
        cfg, m = self.cfg, self.models
        self.gen.train()
        self.gui.eval()
        with self.acc.autocast():
            x0 = sampler.x0_from_eps(b["x_gen"], self.eps(self.gen, b["x_gen"], b["t_gen"], b["embeds"]).float(),
                                     b["t_gen"], self.alphas)
        logs: dict[str, Any] = {}
        loss = torch.zeros((), device=self.device)
        if self.rewards is not None and self.global_step >= cfg.cold_start_iter:
            self.rewards.to(self.device, m.dtype)
            with self.acc.autocast():
                images = sdxl.decode_to_images(m.parts.vae, x0.to(m.dtype))
                reward_loss, reward_logs = self.rewards.loss(images, b["prompts"])
            loss = loss + reward_loss
            logs.update(reward_logs)

        t = b["t_dmd"]
        x_t = sampler.add_noise(x0.detach(), b["noise_dmd"], t, self.alphas)
        real_scale = ts.real_score_lora_scale(cfg.lora_scale_r, self.global_step, cfg.dynamic_step)
        with torch.no_grad(), self.acc.autocast():
            eps_fake = self.eps(self.gui, x_t, t, b["embeds"], lora_scale=cfg.lora_scale_f,
                                uncond=self.neg, cfg=b["cfg_f"])
            eps_real = self.eps(self.gui, x_t, t, b["embeds"], lora_scale=real_scale,
                                uncond=self.neg, cfg=b["cfg_r"])
        x0_fake = sampler.x0_from_eps(x_t, eps_fake.float(), t, self.alphas)
        x0_real = sampler.x0_from_eps(x_t, eps_real.float(), t, self.alphas)
        loss_dmd, _ = losses.dmd_loss(x0, x0_real, x0_fake)
        loss = loss + loss_dmd
        lr = self.update(self.acc, self.gen, self.opt_gen, self.sched_gen, loss)
        logs.update({"loss_gen": loss.detach(), "loss_dmd": loss_dmd.detach(), "real_lora_scale": real_scale,
                     "lr_gen": lr})
        return logs

    def score_timesteps(self, n: int, a: float, b: float) -> torch.Tensor:
        """Continuous timesteps (--s-type-gui) with Beta(a, b): --gui-fit-a/b for the guidance fit,
        --gui-a/b for the DMD scores."""
        return ts.sample_continuous(n, self.s_type_gui, a, b, self.global_step, self.cfg.dynamic_step).to(self.device)

    def update(self, acc, model, optimizer, scheduler, loss: torch.Tensor) -> float:
        """Backward; at the syncing micro-batch clip, step, advance the LR schedule by one and clear
        this model's gradients. Returns the learning rate of this update.

        The two models' gradients never mix (the guidance loss does not reach the generator, the
        DMD scores are computed without grad), so each optimiser clears only its own gradients,
        after its own step: clearing the other's would drop its accumulated micro-batches."""
        lr = scheduler.get_last_lr()[0]
        acc.backward(loss)
        if not acc.sync_gradients:
            return lr
        if self.cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm)
        optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: no step, so no schedule step either
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return lr

    # --- logs, samples, checkpoints ---------------------------------------------------
    def _reduce(self, logs: dict[str, Any]) -> dict[str, float]:
        """Every value (losses, reward scores, ...) averaged over the processes, in one collective."""
        if not logs:
            return {}
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).detach().reshape(())
                              for v in logs.values()])
        if self.acc.num_processes > 1:
            values = self.acc.reduce(values, reduction="mean")
        return dict(zip(logs, values.tolist()))

    def write_gui_log(self, logs: dict[str, Any]) -> None:
        row = self._reduce(logs)
        self.last_loss_gui = row.get("loss_gui")  # shown in the next progress line
        if self.acc.is_main_process:
            full = {"step": self.global_step, "inner_step": self.inner_step, **row, "time": time.time()}
            self.gui_log.append(full)
            self.tracking.log_row("gui", full, "inner_step")

    def write_gen_log(self, logs: dict[str, Any], progress: Progress) -> None:
        row = self._reduce(logs)
        for name in ("clip", "hps"):
            row.setdefault(name, 0.0)
        if not self.acc.is_main_process:
            return
        rates = progress.rates(self.global_step) if self.global_step % self.cfg.log_every == 0 else None
        full = {"step": self.global_step, "inner_step": self.inner_step - 1, **row, "time": time.time()}
        if rates:
            full["images_per_s"] = rates["images_per_s"]
            shown = {k: row[k] for k in ("loss_dmd", "loss_gen", "clip", "hps") if k in row}
            if self.last_loss_gui is not None:  # set by write_gui_log of this same step
                shown["loss_gui"] = self.last_loss_gui
            self.log.info(Progress.line(self.global_step, self.cfg.max_train_steps, rates, shown, lr=full["lr_gen"],
                                        peak_mem_gib=peak_gpu_memory_gib(self.device)))
        self.gen_log.append(full)
        self.tracking.log_row("gen", full, "step")

    def _sample_prompts(self) -> list[str]:
        cfg = self.cfg
        pool = data.load_prompt_list(cfg.sample_prompts) if cfg.sample_prompts else list(data.SAMPLE_PROMPTS)
        n = cfg.batch_size_test * self.acc.num_processes
        pool = (pool * math.ceil(n / len(pool)))[:n]
        per = cfg.batch_size_test
        rank = self.acc.process_index
        return pool[rank * per:(rank + 1) * per]

    @torch.no_grad()
    def sample_grid(self) -> dict[str, float]:
        """Samples of fixed prompts with fixed per-prompt seeds, saved as one grid; with reward
        models configured, their mean scores on these samples (reward curves in the logs)."""
        cfg, m = self.cfg, self.models
        prompts = self.sample_prompts
        embeds = self.encode(prompts)
        self.gen.eval()
        with self.acc.autocast():
            images = inference.seeded_images(lambda x, t: self.eps(self.gen, x, t, embeds), m.parts.vae, self.alphas,
                                             self.grid, prompts, cfg.seed, cfg.resolution, self.device, m.dtype)
        scores = self.sample_scores(images, prompts)
        images = self.acc.gather(images.contiguous())
        all_prompts = gather_object(list(prompts))  # in rank order, as the images
        if self.acc.is_main_process:
            paths = inference.save_sample_grid(images, all_prompts, self.run_dir / "samples", self.global_step, cfg.seed)
            for path in paths:
                self.storage.file_written(path)
            self.tracking.log_samples(images, all_prompts, paths, self.global_step)
            self.log.info(f"samples: {paths[0]} (prompts: {paths[1].name})")
        return scores

    def sample_scores(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Reward scores of the sample images; before the reward phase the models stay on the CPU."""
        if self.rewards is None:
            return {}
        in_phase = self.global_step >= self.cfg.cold_start_iter
        device = self.device if in_phase else torch.device("cpu")
        self.rewards.to(device, self.models.dtype if in_phase else torch.float32)
        with self.acc.autocast() if in_phase else torch.autocast("cpu", enabled=False):
            scores = self.rewards.scores(images.to(device), prompts)
        return {f"sample_{name}": s.mean().to(self.device) for name, s in scores.items()}

    def check_replicas(self) -> None:
        """Data-parallel replicas must hold the same generator; a cheap fingerprint proves it."""
        if self.acc.num_processes == 1 or self.cfg.distributed == "fsdp":
            return
        with torch.no_grad():
            params = list(self.acc.unwrap_model(self.gen).parameters())
            fp = torch.stack([sum(p.double().sum() for p in params), sum(p.double().abs().sum() for p in params)])
        all_fp = self.acc.gather(fp.reshape(1, 2).to(self.device))
        if not torch.equal(all_fp, all_fp[:1].expand_as(all_fp)):
            raise RuntimeError(f"generator replicas differ across processes: {all_fp.tolist()}")
        self.log.info(f"generator replicas identical on {self.acc.num_processes} processes")

    def units(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "inner_step": self.inner_step,
                "data": self.stream.state_dict(), "world_size": self.acc.num_processes, "version": 1}

    def save(self) -> None:
        def save_adapters(gen_dir: Path, gui_dir: Path) -> None:
            sdxl.save_lora(self.acc_gui.unwrap_model(self.gui), gui_dir)
            if self.cfg.use_lora_gen:
                sdxl.save_lora(self.acc.unwrap_model(self.gen), gen_dir)

        self.storage.before_save(stop=self.stop_seen)
        self.ckpt.save(self.global_step, self.units(), save_adapters, prune=False)
        if self.acc.is_local_main_process:
            self.storage.after_save(self.global_step)
            self.ckpt.prune()

    def resume(self) -> int | None:
        cfg = self.cfg
        if self.storage.enabled and cfg.resume_ckpt in ("auto", "latest"):
            # every node resumes the step they agreed on, pulled from the store where missing
            # (older local ones only if it still fails to load)
            candidates = [] if self.agreed_step is None else [
                c for c in self.ckpt.resolve("auto") if c[1] <= self.agreed_step]
            if not candidates and cfg.resume_ckpt == "latest":
                raise UserError(f"--resume-ckpt latest: no complete checkpoint in {self.run_dir} or {self.storage.remote}")
        else:
            candidates = self.ckpt.resolve(self.storage.localise(cfg.resume_ckpt))
        if not candidates and self.cfg.init_ckpt:
            candidates = self.ckpt.resolve(self.storage.localise(cfg.init_ckpt), "--init-ckpt")
            self.log.info(f"nothing to resume in {self.run_dir}: starting from --init-ckpt {self.cfg.init_ckpt}")

        def load_adapters(gen_dir: Path, gui_dir: Path) -> None:
            sdxl.load_lora(self.acc_gui.unwrap_model(self.gui), gui_dir)
            if self.cfg.use_lora_gen:
                sdxl.load_lora(self.acc.unwrap_model(self.gen), gen_dir)

        pairs = [(self.opt_gen, self.sched_gen), (self.opt_gui, self.sched_gui)]
        if candidates and not self.ckpt.is_own(candidates[0][0]):  # another run's: a NEW experiment from its weights
            self.ckpt.init_from(*candidates[0], load_adapters, pairs, keep_optimizer=cfg.init_keep_optimizer)
            set_seed(cfg.seed + self.acc.process_index)  # this run's own random streams
            candidates = []
        if not candidates:
            if self.acc.is_main_process:
                self.gen_log.reset()
                self.gui_log.reset()
            return None

        for i, (ckpt_dir, step) in enumerate(candidates):
            try:
                units = self.ckpt.load(ckpt_dir, step, load_adapters, pairs)
                break
            except Exception as e:  # auto/latest: fall back to the previous complete checkpoint
                if i + 1 == len(candidates) or self.cfg.resume_ckpt not in ("auto", "latest"):
                    raise
                self.log.warning(f"WARNING: {e}; trying an older checkpoint")
        self.global_step, self.inner_step = int(units["global_step"]), int(units["inner_step"])
        self.stream.load_state_dict(units["data"])
        if self.acc.is_main_process:
            self.gen_log.truncate_after(self.global_step)
            self.gui_log.truncate_after(self.inner_step - 1)
        self.log.info(f"resumed from {ckpt_dir}/step-{step}: generator step {self.global_step}, inner step {self.inner_step}")
        return self.global_step if ckpt_dir == self.ckpt.dir else None


def mean_logs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Key-wise mean of the micro-batches' log dicts (tensors or numbers)."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def data_path(spec: str) -> str:
    """Resolve the prompt file: ``builtin:prompts`` is a small file shipped with the package."""
    if spec == "builtin:prompts":
        from importlib import resources

        return str(resources.files("dmdr") / "assets" / "prompts.txt")
    return components.resolve_input_file(spec, "--data-path-train")


def train(cfg: TrainConfig) -> int:
    """Train; returns the exit status (0, or 143 after a SIGTERM stop)."""
    return Trainer(cfg).fit()
