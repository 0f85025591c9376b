"""The process the ``command`` participant starts for each program: a small
supervisor between the bot and the program, run as

    python -I -S _supervisor.py LIFELINE_FD BOT_PID PROGRAM [ARG ...]

in a new session (so its process group is the program's too, and the bot
records it before anything runs).  It

1. waits on the lifeline (a pipe from the bot) for one byte: the bot has
   committed the "started" row, so the program may run.  End of file instead
   (the bot gave up or died) means the program never runs;
2. runs the program (fork, exec: argv as given, no shell), with
   ``PR_SET_PDEATHSIG`` = SIGKILL on Linux, so the program dies with it;
3. kills its whole process group (itself, the program, anything the program
   started) when the bot dies: the lifeline reaches end of file when the
   last copy of its write end closes, which the kernel does for a bot killed
   by SIGKILL, and ``PR_SET_PDEATHSIG`` (SIGUSR1 to the supervisor) says the
   same;
4. exits as the program did: its exit status, or killed by its signal.

It ignores SIGTERM (the bot's SIGTERM to the group is for the program; its
SIGKILL ends everyone).  Standard library only: it runs isolated (-I -S).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable

PR_SET_PDEATHSIG = 1


def _pdeathsig() -> Callable[[int], None]:
    """``prctl(PR_SET_PDEATHSIG, sig)`` where the kernel has it; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return lambda sig: None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError, ImportError):
        return lambda sig: None
    return lambda sig: prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def main(args: list[str]) -> None:
    lifeline, bot, argv = int(args[0]), int(args[1]), args[2:]
    set_pdeathsig = _pdeathsig()

    def kill_everyone(*_: Any) -> None:
        os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, kill_everyone)
    set_pdeathsig(signal.SIGUSR1)
    if os.getppid() != bot:          # the bot died before prctl took effect
        os._exit(125)
    if os.read(lifeline, 1) != b"g":  # not released: never run the program
        os._exit(125)
    me = os.getpid()
    child = os.fork()
    if child == 0:
        try:
            os.close(lifeline)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)
            set_pdeathsig(signal.SIGKILL)
            if os.getppid() != me:
                os._exit(125)
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(2, f"{argv[0]}: cannot run: {exc.strerror or exc}\n".encode(errors="replace"))
            os._exit(127)
        finally:
            os._exit(127)

    def watch() -> None:
        while os.read(lifeline, 64):
            pass
        kill_everyone()

    threading.Thread(target=watch, daemon=True).start()
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):    # SIGKILL, SIGSTOP: always the default
            pass
        os.kill(me, sig)
        os._exit(128 + sig)          # a signal that does not kill by default
    os._exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main(sys.argv[1:])
