"""Helpers shared by the benchmark drivers (stdlib only)."""
import subprocess


def sh(cmd, check=True):
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True)


def cgroup2_root():
    """The cgroup2 mount point (the shortest, i.e. the host's)."""
    best = None
    for line in open("/proc/self/mountinfo"):
        pre, _, post = line.partition(" - ")
        if post.split()[0] == "cgroup2":
            mp = pre.split()[4]
            if best is None or len(mp) < len(best):
                best = mp
    return best
