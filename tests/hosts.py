"""Separate hosts on one machine, for tests: Linux network, mount and UTS namespaces.

Not a test module. Each `Host` is what a real machine of a cluster differs in:

* its own network stack (an `ip netns`), with one interface `eth0` on a private subnet, joined
  to the others by a bridge that lives in a namespace of its own (the machine's own network
  never sees these addresses, and these hosts have no route anywhere else);
* its own hostname (UTS namespace), resolved by a Debian-style /etc/hosts to `127.0.1.1`, the
  address that makes collective backends advertise loopback unless told otherwise;
* its own /tmp, /dev/shm and HOME (`/home/you`), and no view of this checkout: the folder is
  covered by an empty one, with only the virtual environment mounted back at its own path
  (its scripts name their interpreter by absolute path).

A holder process keeps each host's mount and UTS namespaces alive; every command runs inside
all three namespaces through `nsenter`, with a clean environment. `topology()` builds the
hosts and removes them, and ends every process in them, when it exits, pass or fail.
The subnet is chosen among a few private ones after checking that none of its addresses is
used by the machine's own interfaces or routes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"
# docs/CLUSTER.md's addresses first, so its commands run as written; others if the machine
# already uses that range.
SUBNETS = ("10.0.0.0/24", "10.213.37.0/24", "172.31.213.0/24", "192.168.213.0/24")
HOME = "/home/you"
# A folder outside /tmp, /home and the checkout where a host's set-up keeps the virtual
# environment while it covers those (inside the host's own mount namespace only).
SAVED_VENV = "/mnt"
# A holder lives at most this long: a test killed too hard to clean up leaves nothing forever.
HOLDER_LIFETIME_S = 3 * 3600
COMMAND_TIMEOUT_S = 900
# Variables of the machine that every host keeps (see the project's machine notes: some
# processors need OpenBLAS told its core type).
PASSED_THROUGH = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "LANG")


def namespaces_available() -> str | None:
    """None when this process can build hosts; else why not (a skip reason)."""
    if os.geteuid() != 0:
        return "separate hosts need root (network and mount namespaces)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"separate hosts need `{tool}` (iproute2, util-linux)"
    if not Path(SAVED_VENV).is_dir():
        return f"separate hosts need the folder {SAVED_VENV} as a mount point"
    if not (VENV / "bin/python").exists():
        return f"no virtual environment at {VENV} (scripts/setup.sh)"
    return None


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def free_subnet() -> ipaddress.IPv4Network:
    """The first of SUBNETS that overlaps no address or route of this machine."""
    used = []
    for line in _run("ip", "-o", "-4", "addr", "show").stdout.splitlines():
        used.append(ipaddress.ip_interface(line.split()[3]).network)
    for line in _run("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
        target = line.split()[0]
        if target[0].isdigit():
            used.append(ipaddress.ip_network(target, strict=False))
    for candidate in map(ipaddress.ip_network, SUBNETS):
        if not any(candidate.overlaps(network) for network in used):
            return candidate
    raise RuntimeError(f"every test subnet ({', '.join(SUBNETS)}) is in use on this machine")


@dataclass
class Host:
    name: str  # its hostname
    netns: str  # its `ip netns` name
    address: str
    disk: Path  # what it keeps: disk/home is its HOME, disk/tmp its /tmp
    link: str  # its port on the bridge (in the switch namespace)
    switch: str  # the switch namespace
    holder: subprocess.Popen | None = None

    @property
    def home(self) -> Path:
        """Its HOME as seen from outside the host."""
        return self.disk / "home"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": HOME,
            "USER": "root",
            "TMPDIR": "/tmp",
        }
        env.update({k: os.environ[k] for k in PASSED_THROUGH if k in os.environ})
        return {**env, **(extra or {})}

    def argv(self, command: str) -> list[str]:
        """`command` (bash) run inside this host's namespaces, from its HOME."""
        assert self.holder is not None
        return [
            "nsenter", "-t", str(self.holder.pid), "-m", "-u", "-n", "--",
            "bash", "-c", f"cd {HOME} && {command}",
        ]  # fmt: skip

    def run(
        self,
        command: str,
        env: dict[str, str] | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        done = subprocess.run(
            self.argv(command),
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"on {self.name}: {command}\nexit {done.returncode}\n"
                f"{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
            )
        return done

    def popen(self, command: str, log: Path, env: dict[str, str] | None = None):
        """Start `command` in the background, its output to `log` (outside the host)."""
        handle = log.open("ab")
        try:
            return subprocess.Popen(
                self.argv(command),
                env=self.env(env),
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            handle.close()

    def pids(self) -> list[int]:
        done = _run("ip", "netns", "pids", self.netns, check=False)
        return [int(p) for p in done.stdout.split()]

    def processes(self) -> dict[int, str]:
        """pid -> command line of every process in this host."""
        found = {}
        for pid in self.pids():
            with contextlib.suppress(OSError):
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        return found

    def end_processes(self) -> None:
        """End every process of this host but the one holding its namespaces (a reboot)."""
        _end_processes([self], keep={self.holder.pid} if self.holder else set())

    def set_link(self, up: bool) -> None:
        """Plug or unplug this host's cable (its port on the bridge)."""
        _run("ip", "-n", self.switch, "link", "set", self.link, "up" if up else "down")

    # Policy routing, not a firewall: the machine may have no iptables, nft or tc actions, but a
    # routing rule can match a destination port (Linux 4.17+).
    _CUT_TABLE = 77

    def drop_outgoing_tcp(self, port: int) -> None:
        """Blackhole every TCP packet this host sends to `port`: new connections fail at once,
        open ones stall, as when a firewall or a broken route sits between."""
        table = str(self._CUT_TABLE)
        _run("ip", "-n", self.netns, "route", "replace", "blackhole", "default", "table", table)
        _run("ip", "-n", self.netns, "rule", "add", "ipproto", "tcp", "dport", str(port),
             "table", table, "priority", table)  # fmt: skip

    def allow_all_traffic(self) -> None:
        """Undo every `drop_outgoing_tcp`."""
        table = str(self._CUT_TABLE)
        rule = ("ip", "-n", self.netns, "rule", "del", "priority", table)
        for _ in range(64):  # one rule per cut port
            if _run(*rule, check=False).returncode != 0:
                break
        _run("ip", "-n", self.netns, "route", "flush", "table", table, check=False)


def _holder_script(host: Host) -> str:
    """Sets up the host's own files inside its new mount namespace, then holds it."""
    disk, repo, venv = host.disk, REPO, VENV
    steps = [
        "set -e",
        "mount --make-rprivate /",
        f"hostname {host.name}",
        f"mount --bind {disk}/hosts /etc/hosts",
        # The checkout is hidden; its virtual environment, kept aside at SAVED_VENV, comes back at
        # its own path last (its scripts name their interpreter by absolute path, and the
        # checkout may itself be under /tmp).
        f"mount --bind {venv} {SAVED_VENV}",
        f"mount -t tmpfs -o size=1m,mode=755 tmpfs {repo}",
        "mount -t tmpfs -o size=1m,mode=755 tmpfs /home",
        f"mkdir -p {HOME}",
        f"mount --bind {disk}/home {HOME}",
        "mount -t tmpfs -o size=2g,mode=1777 tmpfs /dev/shm",
        # After the others: disk itself may be under /tmp.
        f"mount --bind {disk}/tmp /tmp",
        f"mkdir -p {venv}",
        f"mount --bind {SAVED_VENV} {venv}",
        f"exec sleep {HOLDER_LIFETIME_S}",
    ]
    return "\n".join(steps)


def _start_holder(host: Host) -> None:
    for folder in ("home", "tmp"):
        (host.disk / folder).mkdir(parents=True, exist_ok=True)
    (host.disk / "tmp").chmod(0o1777)
    (host.disk / "hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{host.name}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    host.holder = subprocess.Popen(
        ["ip", "netns", "exec", host.netns, "unshare", "-m", "-u", "--propagation", "private",
         "bash", "-c", _holder_script(host)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    # The holder is ready once it is `sleep`: the mounts are done.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if host.holder.poll() is not None:
            raise RuntimeError(f"host {host.name}: set-up failed: {host.holder.stderr.read()}")
        with contextlib.suppress(OSError):
            if Path(f"/proc/{host.holder.pid}/comm").read_text().strip() == "sleep":
                return
        time.sleep(0.05)
    raise RuntimeError(f"host {host.name}: set-up did not finish in 30 s")


def _end_processes(
    hosts: Sequence[Host], grace_s: float = 10.0, keep: set[int] | None = None
) -> None:
    """SIGTERM every process in the hosts (but `keep`), then SIGKILL what is left after
    `grace_s`; all hosts at once, so that their grace periods overlap."""

    def left() -> list[int]:
        return [pid for host in hosts for pid in host.pids() if pid not in (keep or set())]

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not left():
            return
        for pid in left():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while left() and time.monotonic() < deadline:
            time.sleep(0.2)


@contextlib.contextmanager
def topology(names: Sequence[str], disk: Path) -> Iterator[dict[str, Host]]:
    """Hosts named `names`, addressed .1, .2, ... in a free subnet, each with its files in
    disk/<name>; all gone (processes ended, namespaces deleted) when the block exits."""
    subnet = free_subnet()
    tag = uuid.uuid4().hex[:6]
    switch = f"ddpm-{tag}-sw"
    hosts: dict[str, Host] = {}
    addresses = list(subnet.hosts())
    try:
        _run("ip", "netns", "add", switch)
        _run("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", switch, "link", "set", "br0", "up")
        for index, name in enumerate(names):
            host = Host(
                name=name,
                netns=f"ddpm-{tag}-{name}",
                address=str(addresses[index]),
                disk=disk / name,
                link=f"port{index}",
                switch=switch,
            )
            hosts[name] = host
            _run("ip", "netns", "add", host.netns)
            outside = f"d{tag}p{index}"  # interface names have at most 15 characters
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", f"{outside}h")
            _run("ip", "link", "set", outside, "netns", switch)
            _run("ip", "link", "set", f"{outside}h", "netns", host.netns)
            _run("ip", "-n", switch, "link", "set", outside, "name", host.link)
            _run("ip", "-n", switch, "link", "set", host.link, "master", "br0", "up")
            _run("ip", "-n", host.netns, "link", "set", f"{outside}h", "name", "eth0")
            _run("ip", "-n", host.netns, "addr", "add", f"{host.address}/{subnet.prefixlen}",
                 "dev", "eth0")  # fmt: skip
            _run("ip", "-n", host.netns, "link", "set", "eth0", "up")
            _run("ip", "-n", host.netns, "link", "set", "lo", "up")
            _start_holder(host)
        yield hosts
    finally:
        with contextlib.suppress(Exception):
            _end_processes(list(hosts.values()))
        for host in hosts.values():
            _run("ip", "netns", "del", host.netns, check=False)
        _run("ip", "netns", "del", switch, check=False)
