"""The trainer's side of object storage: preflight, resume from S3, background sync.

`RunStorage` wraps one `dmdr.storage.Syncer` per node (on the node's local main process) and
keeps the trainer free of S3 details: the trainer calls `restore`, `before_save`, `after_save`,
`file_written` and `close`. Without ``--s3-uri`` every call is a no-op. `localise` turns an
``s3://`` --init-ckpt / --resume-ckpt into a pulled local checkpoint (with or without --s3-uri).

Before anything is written, the run is claimed: with a store, rank 0 takes the run's lease
(`dmdr.storage.lease`: one writer per run; renewed in the background from then on), then the
run directory and the store must not already hold a run unless ``--resume-ckpt`` continues it or
``--overwrite`` clears it (`dmdr.run_claim`).
"""
from __future__ import annotations

import atexit
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from accelerate.utils import broadcast_object_list

from dmdr import run_claim
from dmdr.checkpoint import loadable_steps, marker_path, verify_checkpoint
from dmdr.config import TrainConfig
from dmdr.errors import UserError
from dmdr.logs import get_logger

# Log files restored from the store when a fresh pod resumes there (so they continue, not restart).
RESTORED_LOGS = ("log.txt", "loss_logs/loss_gen_log.jsonl", "loss_logs/loss_gui_log.jsonl", "tracking.json")


class RunStorage:
    def __init__(self, cfg: TrainConfig, run_dir: Path, acc):
        self.cfg, self.run_dir, self.acc = cfg, run_dir, acc
        self.syncer = None
        self.pulled: int | None = None  # the step restore() downloaded, if any
        self.pulled_check = ""  # what verified it (sha256, or sizes only)
        self.remote_latest: int | None = None
        self.submitted: set[int] = set()
        self.enabled = bool(cfg.s3_uri)
        self.lease = None
        self.notes: list[str] = []  # lines for the run log once it is open (lease, --overwrite)
        self.lost: str | None = None  # why this job may no longer write the run (lease lost)
        self.removed_remote = 0  # objects --overwrite deleted
        if self.enabled:
            self._connect()
        self._claim_run_dir()

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the main process; every rank gets its result or raises its UserError."""
        box: list[Any] = [None, None]
        if self.acc.is_main_process:
            try:
                box = [fn(), None]
            except UserError as exc:
                box = [None, str(exc)]
                if self.acc.num_processes == 1:
                    raise
            except Exception as exc:
                if self.acc.num_processes > 1:
                    broadcast_object_list([None, f"rank 0 failed: {type(exc).__name__}"], from_process=0)
                raise
        if self.acc.num_processes > 1:
            broadcast_object_list(box, from_process=0)
        if box[1] is not None:
            raise UserError(box[1])
        return box[0]

    def _connect(self) -> None:
        cfg, acc = self.cfg, self.acc
        from dmdr.storage.client import StorageConfig, preflight
        from dmdr.storage.uri import S3Uri

        self.storage_cfg = StorageConfig(s3_uri=cfg.s3_uri, endpoint_url=cfg.s3_endpoint_url,
                                         region=cfg.s3_region, path_style=cfg.s3_path_style)
        self.remote = str(S3Uri.parse(cfg.s3_uri).join(cfg.exp_name))
        if acc.is_local_main_process:
            preflight(self.storage_cfg)  # fails in seconds with one clear message
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        self.num_nodes = max(1, acc.num_processes // max(local_world, 1))
        self.node_rank = int(os.environ.get("GROUP_RANK", acc.process_index // max(local_world, 1)))
        from dmdr.storage.lease import job_id, new_job_id

        ids = [job_id() or new_job_id(), uuid.uuid4().hex] if acc.is_main_process else [None, None]
        if acc.num_processes > 1:
            broadcast_object_list(ids, from_process=0)
        self.holder, self.attempt = ids
        self.notes.append(self._on_main(self._acquire))  # one writer per run: another job's run is refused here
        if acc.is_local_main_process:
            if self.lease is None:  # nodes > 0: follow the lease to stop when the job loses it
                self.lease = self._new_lease()
            self.lease.start(self._lose, write=self.node_rank == 0)

    def _new_lease(self):
        from dmdr.storage.client import make_client
        from dmdr.storage.lease import Lease
        from dmdr.storage.uri import S3Uri

        return Lease(make_client(self.storage_cfg), S3Uri.parse(self.remote), self.holder, self.attempt,
                     ttl=self.cfg.lease_ttl, renew_every=self.cfg.lease_renew)

    def _acquire(self) -> str:
        from dmdr.storage.client import storage_errors
        from dmdr.storage.uri import S3Uri

        self.lease = self._new_lease()
        with storage_errors(self.storage_cfg, S3Uri.parse(self.remote)):
            how = self.lease.acquire(takeover=self.cfg.takeover)
        atexit.register(self.lease.release)  # whatever ends this process, the next job need not wait
        return how

    def _lose(self, reason: str) -> None:
        """The lease thread found another job in the run's lease: stop writing, tell the trainer."""
        self.lost = reason
        if self.syncer is not None:
            self.syncer.stop_writing(reason)

    def _fence(self) -> str | None:
        from dmdr.storage.lease import LeaseLost

        try:
            self.lease.check()
        except LeaseLost as exc:
            self.lost = str(exc)
        return self.lost

    # --- a rerun never mixes two runs --------------------------------------------------------
    def _claim_run_dir(self) -> None:
        """Refuse to start a new run where one exists (unless --resume-ckpt); --overwrite clears it."""
        cfg, acc = self.cfg, self.acc
        if cfg.resume_ckpt is not None and not cfg.overwrite:
            return
        from accelerate.utils import gather_object

        local = run_claim.local_progress(self.run_dir) if acc.is_local_main_process else None
        per_node = gather_object([local]) if acc.num_processes > 1 else [local]
        step = self._on_main(lambda: self._remote_claim(run_claim.newest(*per_node)))
        if step is None:
            return
        removed = run_claim.clear_local(self.run_dir) if acc.is_local_main_process else 0
        acc.wait_for_everyone()
        self.notes.append(f"--overwrite: removed the earlier run (up to step {step}): {removed} file(s) in "
                          f"{self.run_dir}" + (f" and {self.removed_remote} object(s) under {self.remote}"
                                               if self.enabled else ""))

    def _remote_claim(self, local: int | None) -> int | None:
        """Main process: the earlier run's step (None: none); refuse it, or delete its objects."""
        from dmdr.storage.client import make_client, storage_errors
        from dmdr.storage.lease import LEASE_REL
        from dmdr.storage.remote import delete_run
        from dmdr.storage.uri import S3Uri

        remote = None
        if self.enabled:
            exp = S3Uri.parse(self.remote)
            client = make_client(self.storage_cfg)
            with storage_errors(self.storage_cfg, exp):
                remote = run_claim.remote_progress(client, exp)
        step = run_claim.newest(local, remote)
        if step is None:
            return None
        if not self.cfg.overwrite:
            where = self.run_dir if local is not None else self.remote
            raise UserError(run_claim.refusal(str(where), step))
        self.removed_remote = 0
        if self.enabled:
            with storage_errors(self.storage_cfg, exp):
                self.removed_remote = delete_run(client, exp, keep=(LEASE_REL,))
        return step

    # --- resume --------------------------------------------------------------------------
    def restore(self) -> int | None:
        """Settle, across all nodes, the step to resume from and make it loadable everywhere.

        The step is the newest one that every node has locally (loadable) or that the store has
        complete; a node lacking it pulls it (once per node, sha256-verified), and the main
        process pulls the store's logs its node lacks (`_pull_logs`), wherever it ran before.
        Every rank takes part, so the barriers match. Returns the
        agreed step (None: nothing to resume) and remembers the store's latest for `start`.
        """
        if not self.enabled or self.cfg.resume_ckpt not in ("auto", "latest"):
            return None
        from accelerate.utils import gather_object

        from dmdr.storage.layout import verification
        from dmdr.storage.remote import download_checkpoint, list_checkpoints

        local, damaged = self._intact_local_steps()
        gathered = gather_object([(local, damaged)]) if self.acc.num_processes > 1 else [(local, damaged)]
        per_rank = [steps for steps, _ in gathered]
        damaged = any(d for _, d in gathered)
        remote = [None]
        if self.acc.is_main_process:
            infos = list_checkpoints(self.remote, self.storage_cfg)
            for info in infos:
                if info.damaged:
                    get_logger().warning(f"WARNING: {info.damaged}; skipping step-{info.step}")
            remote = [sorted(c.step for c in infos if c.complete)]
        if self.acc.num_processes > 1:
            broadcast_object_list(remote, from_process=0)
        remote_steps = set(remote[0])
        self.remote_latest = max(remote_steps, default=None)
        common = {s for s in set().union(remote_steps, *map(set, per_rank))
                  if all(s in remote_steps or s in steps for steps in per_rank)}
        while True:  # a damaged remote checkpoint is skipped: the previous complete one is tried
            target = max(common, default=None)
            error = None
            if target is not None and target not in local and self.acc.is_local_main_process:
                try:
                    manifest = download_checkpoint(self.remote, target, self.run_dir, cfg=self.storage_cfg,
                                                   progress=False)
                    self.pulled, self.pulled_check = target, verification(manifest)
                except UserError as e:
                    error = str(e)
            errors = gather_object([error]) if self.acc.num_processes > 1 else [error]
            if not any(errors):
                break
            common.discard(target)
            damaged = True
            get_logger().warning(f"WARNING: {next(e for e in errors if e)}; skipping step-{target}")
        if target is None and damaged:  # never start from scratch over a run whose checkpoints are damaged
            raise UserError(f"no intact checkpoint to resume in {self.run_dir} or {self.remote}: see `dmdr ls`, "
                            "repair or delete the damaged checkpoints, or use a new --exp-name")
        if damaged:
            get_logger().warning(f"WARNING: resuming from step-{target}, the newest intact checkpoint")
        if target is not None:  # the main process writes the logs, on whichever node it runs now
            self._on_main(self._restore_logs)
        self.acc.wait_for_everyone()
        return target

    def localise(self, spec: str | None) -> str | None:
        """A checkpoint spec the Checkpointer reads: ``s3://bucket/prefix/exp[/step-N]`` (no step:
        the run's latest complete checkpoint, settled by the main process for all) is pulled as
        `dmdr pull` does (sha256-verified, marker last, once per node) into
        ``<cache-dir>/init-ckpt/<bucket>/<prefix>/<exp>`` (this run's own remote: into its run
        directory, a resume) and its marker path returned. Anything else passes through."""
        from dmdr.storage.uri import S3Uri, is_s3_uri

        if not is_s3_uri(spec):
            return spec
        from dmdr.storage.client import StorageConfig
        from dmdr.storage.remote import download_checkpoint, require_latest, split_step

        exp_uri, step = split_step(spec)
        scfg = StorageConfig(s3_uri=exp_uri, endpoint_url=self.cfg.s3_endpoint_url, region=self.cfg.s3_region,
                             path_style=self.cfg.s3_path_style)
        if step is None:
            box = [require_latest(exp_uri, scfg) if self.acc.is_main_process else None]
            if self.acc.num_processes > 1:
                broadcast_object_list(box, from_process=0)
            step = box[0]
        exp = S3Uri.parse(exp_uri)
        own = self.enabled and exp_uri == self.remote
        dest = self.run_dir if own else Path(self.cfg.cache_dir).expanduser() / "init-ckpt" / exp.bucket / exp.key
        if self.acc.is_local_main_process:
            from dmdr.storage.layout import verification

            manifest = download_checkpoint(exp_uri, step, dest, cfg=scfg, progress=False)
            get_logger().info(f"pulled checkpoint step-{step} of {exp_uri} into {dest} ({verification(manifest)})")
        self.acc.wait_for_everyone()
        return str(marker_path(dest / "checkpoints", step))

    def _intact_local_steps(self) -> tuple[list[int], bool]:
        """Loadable local steps, newest first checked against their markers (sha256 where the
        marker has it) on the local main process: a damaged one is renamed
        ``step-N.damaged.json`` (so it is pulled again, or skipped), with a warning."""
        ckpt_dir = self.run_dir / "checkpoints"
        steps = loadable_steps(ckpt_dir)
        damaged = False
        if not self.acc.is_local_main_process:
            return steps, damaged
        for step in reversed(list(steps)):
            try:
                verify_checkpoint(ckpt_dir, step, hashes=True)
                break
            except UserError as e:
                marker_path(ckpt_dir, step).replace(ckpt_dir / f"step-{step}.damaged.json")
                steps.remove(step)
                damaged = True
                get_logger().warning(f"WARNING: {e}; it is set aside (step-{step}.damaged.json) and "
                                     "pulled again from the store, or an older checkpoint is used")
        return steps, damaged

    def _restore_logs(self) -> None:
        from dmdr.storage.client import make_client, storage_errors
        from dmdr.storage.uri import S3Uri

        client = make_client(self.storage_cfg)
        remote = S3Uri.parse(self.remote)
        with storage_errors(self.storage_cfg, remote):
            self._pull_logs(client, remote)

    def _pull_logs(self, client, remote) -> None:
        """The store's copy of each log replaces a local one that is missing (a fresh pod, or a
        node that was not the main one) or, for the append-only logs, shorter (this node was the
        main one before another was): the resumed run continues the whole history."""
        from botocore.exceptions import ClientError

        from dmdr.storage.remote import get_files

        def behind(rel: str) -> bool:
            local = self.run_dir / rel
            if not local.exists():
                return True
            if not rel.endswith((".txt", ".jsonl")):
                return False
            obj = remote.join(rel)
            try:
                size = client.head_object(Bucket=obj.bucket, Key=obj.key)["ContentLength"]
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return False
                raise
            return size > local.stat().st_size

        get_files(client, remote, [rel for rel in RESTORED_LOGS if behind(rel)], self.run_dir)

    def start(self, resumed_step: int | None) -> None:
        """Start the background syncer (after resume, so restored files are not re-uploaded
        needlessly); drop remote leftovers of a killed attempt above the resumed step, and upload
        the resumed checkpoint if the store does not have it yet."""
        for note in filter(None, self.notes):
            get_logger().info(note)
        if self.pulled is not None:
            get_logger().info(f"pulled checkpoint step-{self.pulled} from {self.remote} ({self.pulled_check})")
        if not self.enabled or not self.acc.is_local_main_process:
            return
        from dmdr.storage.syncer import Syncer

        self.syncer = Syncer(self.run_dir, self.remote, self.storage_cfg,
                             keep_last=self.cfg.keep_last or None, sync_interval=self.cfg.sync_interval,
                             node_rank=self.node_rank, num_nodes=self.num_nodes, attempt=self.attempt,
                             fence=self._fence)
        if self.lost:
            self.syncer.stop_writing(self.lost)
        if self.node_rank == 0:
            self.syncer.discard_after(resumed_step)
        remote_step = self.remote_latest
        if resumed_step is not None and (remote_step is None or remote_step < resumed_step):
            self.after_save(resumed_step)
        self.syncer.sync_logs()
        get_logger().info(f"syncing {self.run_dir} to {self.remote}")

    # --- during training ------------------------------------------------------------------
    def before_save(self, stop: Callable[[], bool] | None = None) -> None:
        """The previous checkpoint's upload must finish before the next save (unless the store is
        down, or `stop()` turns true: a stop request ends the wait within a second)."""
        if self.syncer is None or self.lost or self.syncer.wait_checkpoint(timeout=self.cfg.s3_wait_timeout, stop=stop):
            return
        if stop is None or not stop():
            get_logger().warning(
                f"WARNING: the previous checkpoint is not uploaded yet (store slow or down); saving locally and "
                f"training on: the newest checkpoint is uploaded when {self.remote} answers again")

    def after_save(self, step: int) -> None:
        if self.syncer is not None:
            self.submitted.add(step)
            # the logs up to this step go first: the syncer publishes the checkpoint only once they
            # are in the store, since a resume on an empty disk takes both from there
            self.syncer.sync_logs()
            self.syncer.submit_checkpoint(step)

    def uploading(self) -> set[int]:
        """Checkpoints submitted but neither uploaded nor replaced yet: local retention keeps them."""
        if self.syncer is None:
            return set()
        return self.submitted - set(self.syncer.uploaded_checkpoints) - set(self.syncer.abandoned_checkpoints)

    def file_written(self, path: Path) -> None:
        if self.syncer is not None:
            self.syncer.upload(path.relative_to(self.run_dir).as_posix())

    def close(self, timeout: float | None, stop: Callable[[], bool] | None = None) -> bool:
        """Upload what is pending (logs included) within ``timeout`` seconds; True when all went.
        Once `stop()` is true (a signal), at most ``--shutdown-grace`` more seconds are spent.
        Releases the run's lease; a job that lost it (another job took the run over) raises."""
        done = True
        if self.syncer is not None:
            if stop is not None and not self.syncer.flush(timeout, stop=stop):
                timeout = self.cfg.shutdown_grace if stop() else 0
            done = self.syncer.close(timeout)
        if self.lease is not None:
            self.lease.stop()
            self.lease.release()  # only the job's rank 0 holds it
        if self.lost:
            raise UserError(self.lost)
        return done

    def close_node_0_last(self, timeout: float, stop: Callable[[], bool] | None = None) -> bool:
        """`close` on every rank at the end of a run, node 0 last: the other nodes' uploads (their
        parts of the last checkpoint) finish, a barrier, then node 0 merges the parts and publishes.
        So node 0 never waits on the store for the part of a node that is gone: the lost node fails
        the barrier at once. (Node 0 used to wait for it; torchrun, its rendezvous gone with that
        node, sent SIGTERM and the wait went on for --shutdown-grace: the pod, and the job's
        recovery, waited for torchrun's --shutdown-timeout.)"""
        if not self.enabled or self.num_nodes == 1:
            return self.close(timeout, stop)
        deadline = time.monotonic() + timeout
        done, error = True, None
        if self.node_rank != 0:
            try:
                done = self.close(timeout, stop)
            except UserError as exc:  # the lease lost: raised after the barrier, so node 0 says it too
                error = exc
        self.acc.wait_for_everyone()
        if error is not None:
            raise error
        if self.node_rank == 0:
            done = self.close(max(1.0, deadline - time.monotonic()), stop)
        return done
