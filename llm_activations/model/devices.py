"""Telling the user why the accelerator could not be opened - the stale TPU lockfile case.

On a TPU VM only one process may open the chips. libtpu records the owner in /tmp/libtpu_lockfile;
a crashed run can leave that file behind, and every later run then fails with an opaque backend
error. We recognise that error and say what to check: which processes hold /dev/accel* or
/dev/vfio/* right now, and whether the lockfile is stale (nobody holds the chips).
"""

from __future__ import annotations

import os

LOCKFILE = "/tmp/libtpu_lockfile"
BUSY_HINTS = ("libtpu_lockfile", "TPU is already in use", "already in use by", "Device or resource busy",
              "Unable to initialize backend 'tpu'", "open(/dev/accel", "/dev/vfio")


def accelerator_holders(proc: str = "/proc") -> list[tuple[int, str]]:
    """(pid, command line) of processes with a TPU device file open."""
    holders = []
    for pid in filter(str.isdigit, _listdir(proc)):
        fd_dir = os.path.join(proc, pid, "fd")
        for fd in _listdir(fd_dir):
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith(("/dev/accel", "/dev/vfio/")):
                try:
                    with open(os.path.join(proc, pid, "cmdline"), "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                except OSError:
                    cmd = "?"
                holders.append((int(pid), cmd))
                break
    return holders


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def explain_busy_accelerator(error: BaseException, lockfile: str = LOCKFILE, proc: str = "/proc") -> str | None:
    """A one-line diagnosis if `error` looks like 'the TPU is held by someone else', else None."""
    text = f"{type(error).__name__}: {error}"
    if not any(h in text for h in BUSY_HINTS):
        return None
    holders = [(pid, cmd) for pid, cmd in accelerator_holders(proc) if pid != os.getpid()]
    if holders:
        who = "; ".join(f"pid {pid} ({cmd[:80]})" for pid, cmd in holders)
        return (f"the TPU is held by another process: {who}. Stop it (or wait for it) and rerun; "
                "only one process per host may own the chips")
    if os.path.exists(lockfile):
        return (f"the TPU could not be opened and no process holds it: {lockfile} is a stale lock left by a "
                f"crashed run. Check with `sudo lsof -w /dev/accel* /dev/vfio/*`, then `rm {lockfile}` and rerun")
    return ("the TPU could not be opened (another process may hold it). Check `sudo lsof -w /dev/accel* /dev/vfio/*` "
            "and stop that process; only one process per host may own the chips")
