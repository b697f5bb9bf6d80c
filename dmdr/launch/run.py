"""`python -m dmdr.launch.run ARGS`: torchrun with ARGS, but a signal-driven stop exits 128 + signal.

torchrun (torch.distributed.run) stops its workers on SIGTERM and then exits **1** (an uncaught
SignalException). The training operator's `restartPolicy: ExitCode` retries only exit codes
>= 128, so a node drain or a preemption would fail the whole job instead of restarting it.
This runs torchrun in this process (it stays PID 1 of the container and handles the signals
itself) and turns that one exception into exit 128 + the signal (143 after SIGTERM); every
other outcome is torchrun's own, except one: workers that failed with exit 2 (dmdr's UserError,
a bad config) make it exit 2 too, which a Job's podFailurePolicy turns into a failed job at
once instead of retries that cannot help.

Under an Indexed Job or a JobSet (JOB_COMPLETION_INDEX is set) with a c10d rendezvous, the
index-0 pod hosts the rendezvous store (`is_host` in PET_RDZV_CONF): the store's name is that
pod's DNS name, which may not resolve to itself yet while the pod starts, and no other pod may
ever host it.
"""
from __future__ import annotations

import os
import signal
import sys

USAGE_ERROR = 2  # dmdr's UserError exit status (and argparse's)


def store_host_conf(env: dict[str, str]) -> None:
    """Add is_host=<index is 0> to PET_RDZV_CONF for an indexed pod in a c10d rendezvous."""
    index = env.get("JOB_COMPLETION_INDEX")
    conf = env.get("PET_RDZV_CONF", "")
    if index is None or env.get("PET_RDZV_BACKEND") != "c10d" or "is_host=" in conf:
        return
    env["PET_RDZV_CONF"] = ",".join(filter(None, [conf, f"is_host={'true' if index == '0' else 'false'}"]))


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    def stop(signum: int, frame: object) -> None:
        raise SignalException(f"got signal {signum}", sigval=signal.Signals(signum))

    # torchrun installs its handlers only when it starts the workers; until then (rendezvous)
    # a SIGTERM to PID 1 of a container would be ignored until the kubelet's SIGKILL.
    signal.signal(signal.SIGTERM, stop)
    store_host_conf(os.environ)  # torchrun reads its PET_* defaults from os.environ
    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except SignalException as exc:
        status = 128 + int(exc.sigval)
        print(f"dmdr.launch.run: workers stopped on {exc.sigval.name}; exiting {status}",
              file=sys.stderr, flush=True)
        return status
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode != USAGE_ERROR:
            raise
        print(f"dmdr.launch.run: rank {rank} failed with exit {USAGE_ERROR} (a usage or config "
              f"error); exiting {USAGE_ERROR}", file=sys.stderr, flush=True)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
