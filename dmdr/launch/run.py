"""`python -m dmdr.launch.run ARGS`: torchrun with ARGS, but a signal-driven stop exits 128 + signal.

torchrun (torch.distributed.run) stops its workers on SIGTERM and then exits **1** (an uncaught
SignalException). The training operator's `restartPolicy: ExitCode` retries only exit codes
>= 128, so a node drain or a preemption would fail the whole job instead of restarting it.
This runs torchrun in this process (it stays PID 1 of the container and handles the signals
itself) and turns that one exception into exit 128 + the signal (143 after SIGTERM); every
other outcome is torchrun's own.
"""
from __future__ import annotations

import signal
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    def stop(signum: int, frame: object) -> None:
        raise SignalException(f"got signal {signum}", sigval=signal.Signals(signum))

    # torchrun installs its handlers only when it starts the workers; until then (rendezvous)
    # a SIGTERM to PID 1 of a container would be ignored until the kubelet's SIGKILL.
    signal.signal(signal.SIGTERM, stop)
    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except SignalException as exc:
        status = 128 + int(exc.sigval)
        print(f"dmdr.launch.run: workers stopped on {exc.sigval.name}; exiting {status}",
              file=sys.stderr, flush=True)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
