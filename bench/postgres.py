"""A PostgreSQL server on a directory given, as the Debian package installs it: started as
the ``postgres`` user with its socket in a directory of its own, no TCP. Used by the
database crash test (tests/e2e/test_postgres_async.py) and the pgbench benchmark."""
from __future__ import annotations

import glob
import re
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

#: What pgbench's TPC-B-like transactions keep equal: every balance moved is in history.
TPCB_SUMS = ("select (select sum(abalance) from pgbench_accounts), "
             "(select sum(bbalance) from pgbench_branches), "
             "(select sum(tbalance) from pgbench_tellers), "
             "(select coalesce(sum(delta), 0) from pgbench_history), "
             "(select count(*) from pgbench_history)")


def missing() -> str | None:
    """Why PostgreSQL cannot run here, or None."""
    if not glob.glob("/usr/lib/postgresql/*/bin/pg_ctl") or shutil.which("pgbench") is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if shutil.which("runuser") is None:
        return "runuser is missing (util-linux)"
    try:
        import pwd
        pwd.getpwnam("postgres")
    except KeyError:
        return "no 'postgres' user (apt-get install postgresql creates it)"
    return None


def bindir() -> Path:
    """The newest installed PostgreSQL's programs."""
    return Path(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))[-1]).parent


def workdir() -> Path:
    """A directory the postgres user can reach (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="x2x-pg-"))
    d.chmod(0o755)
    return d


class Postgres:
    """One server on ``data`` (made with initdb when ``init``)."""

    def __init__(self, data: Path, port: int) -> None:
        self.bin, self.data, self.port = bindir(), data, port
        self.sock = Path(tempfile.mkdtemp(prefix="x2x-pgsock-"))

    def _as_pg(self, *args: str, timeout: float = 180,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True,
                           text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, f"{' '.join(args)}:\n{r.stdout}\n{r.stderr}"
        return r

    def init(self, waldir: Path | None = None) -> None:
        """initdb; ``waldir``: the write-ahead log there (another disk), not in ``data``."""
        self.data.mkdir()
        shutil.chown(self.data, "postgres", "postgres")
        wal = []
        if waldir is not None:
            waldir.parent.mkdir(parents=True, exist_ok=True)
            shutil.chown(waldir.parent, "postgres", "postgres")
            wal = ["-X", str(waldir)]
        self._as_pg(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", *wal)

    def start(self) -> None:
        """Start, recovering from a crash if the data directory had one."""
        self.sock.mkdir(mode=0o700, exist_ok=True)     # gone after a kill or a stop
        shutil.chown(self.sock, "postgres", "postgres")
        shutil.chown(self.data, "postgres", "postgres")
        os.chmod(self.data, 0o700)
        (self.data / "postmaster.pid").unlink(missing_ok=True)   # from a killed server
        log = self.sock / "server.log"
        r = self._as_pg(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-t", "120",
                        "-l", str(log), "-o",
                        f"-k {self.sock} -p {self.port} -c listen_addresses='' -c fsync=on "
                        f"-c synchronous_commit=on -c full_page_writes=on", "start",
                        check=False)
        # The server's own log says why a start failed (recovery, a bad page); pg_ctl not.
        assert r.returncode == 0, (f"PostgreSQL did not start on {self.data}:\n{r.stdout}"
                                   f"{r.stderr}\n{log.read_text(errors='replace')[-4000:]}"
                                   if log.exists() else r.stdout + r.stderr)

    def psql(self, sql: str) -> str:
        return self._as_pg("psql", "-h", str(self.sock), "-p", str(self.port), "-d",
                           "postgres", "-At", "-c", sql).stdout.strip()

    def tps(self, clients: int, seconds: int) -> float:
        """pgbench's TPC-B-like run: transactions per second, as pgbench reports them."""
        out = self._as_pg("pgbench", "-h", str(self.sock), "-p", str(self.port), "-n", "-c",
                          str(clients), "-j", str(clients), "-T", str(seconds), "postgres",
                          timeout=seconds + 120).stdout
        m = re.search(r"tps = ([\d.]+)", out)
        assert m, out
        return float(m.group(1))

    def pgbench(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(["runuser", "-u", "postgres", "--", "pgbench", "-h",
                                 str(self.sock), "-p", str(self.port), *args, "postgres"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def init_bench(self, scale: int) -> None:
        self._as_pg("pgbench", "-h", str(self.sock), "-p", str(self.port), "-i", "-q", "-s",
                    str(scale), "postgres")

    def tpcb(self) -> tuple[int, int]:
        """(transactions in history, the common sum), asserting the four sums agree."""
        a, b, t, h, n = (int(x or 0) for x in self.psql(TPCB_SUMS).split("|"))
        assert a == b == t == h, f"TPC-B sums disagree: accounts {a}, branches {b}, " \
                                 f"tellers {t}, history {h}"
        return n, a

    def kill(self) -> None:
        """What a crash of the host does to the server: SIGKILL, no shutdown."""
        pid_file = self.data / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            self._forget_socket()
            return
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                  text=True).stdout.split()
        for p in [pid, *map(int, children)]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self._forget_socket()

    def stop(self) -> None:
        self._as_pg(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                    "stop", check=False)
        self._forget_socket()

    def _forget_socket(self) -> None:
        # One directory a server: left behind, every database test and pgbench run leaked
        # one into /tmp (1,400 of them on a machine that had run the suite for a week).
        shutil.rmtree(self.sock, ignore_errors=True)
