"""x2x capture and x2x apply: the two services of a pair."""
from __future__ import annotations

import signal
import ssl
import sys
import threading

import typer
from rich.progress import (BarColumn, DownloadColumn, Progress, TimeRemainingColumn,
                           TransferSpeedColumn)

from cli.common import console, disk_share, err_console, human_bytes, print_json, settings
from consumers.applier import Applier
from consumers.checkpoint import CheckpointStore
from infra import control, images, pins
from infra.keys import key_for, remember_file
from infra.tls import TLSMode, create_certificates, server_context
from journal.errors import BadInput, BrokerError
from infra.kafka import KafkaSettings
from journal.pairs import PairSpec
from journal.plans import apply_target
from producers.journaling import Mode
from producers.nbd_capture import CUT_INTERVAL, Listen, NBDCapture, parse_listen
from schemas.cipher import JournalKey
from producers.scan import ScanResult, scan_once
from producers.direction import prepare_capture
from producers.state import StateStore


def _progress(enabled: bool) -> Progress:
    return Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=err_console,
                    disable=not enabled, transient=True)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def capture(ctx: typer.Context, name: str,
            once: bool = typer.Option(False, "--once", help="Scan once and exit (default)."),
            interval: float = typer.Option(0.0, help="Scan again every SECONDS, until stopped."),
            rebaseline: bool = typer.Option(False, "--rebaseline", "--resync",
                                            help="Forget the hash map: publish a full "
                                            "baseline in a new epoch (--resync is its "
                                            "former name)."),
            nbd: str = typer.Option(None, "--nbd", metavar="[HOST:]PORT|PATH",
                                    help="Serve the source over NBD (export name = pair name) "
                                    "and journal every write, until SIGTERM/SIGINT. HOST is "
                                    "127.0.0.1 unless given; NBD's usual port is 10809. A "
                                    "PATH (with a '/') serves on a unix socket there, "
                                    "owner-only: the cheapest way for clients on this "
                                    "machine."),
            mode: str = typer.Option(None, "--mode", metavar="async|flush-sync|sync",
                                     help="With --nbd: what a client waits for. async "
                                     "(default): the source only, the journal follows; "
                                     "flush-sync: a FLUSH also waits for the journal; sync: "
                                     "every write waits for the journal."),
            cut_interval: float = typer.Option(
                None, "--cut-interval", metavar="SECONDS",
                help="With --nbd: while clients write without FLUSH, make a consistency "
                "point on the target every SECONDS (default 1; 0: only at client FLUSHes). "
                "It makes the target a crash-consistent copy; it does not make the source "
                "durable. With --trace: seconds between freeze cuts (default 5)."),
            key_file: str = typer.Option(None, help="The pair's key file, if it is encrypted "
                                         "(default $X2X_HOME/keys/NAME.key)."),
            tls: str = typer.Option(None, "--tls", metavar="off|on|require",
                                    help="With --nbd: offer TLS to clients (on) or refuse "
                                    "clients without it (require). Needs --tls-certificates."),
            tls_certificates: str = typer.Option(
                None, "--tls-certificates", metavar="DIR",
                help="server-cert.pem, server-key.pem and ca-cert.pem (clients must then "
                "present a certificate it signed); make them with 'x2x nbd-certs DIR'."),
            on_fence: str = typer.Option(None, "--on-fence", metavar="CMD", help="With "
                                         "automatic failover: a shell command run when "
                                         "the lease lapses and writes stop (X2X_PAIR, "
                                         "X2X_EPOCH, X2X_REASON in its environment)."),
            trace: bool = typer.Option(False, "--trace", help="Live capture of a block "
                                       "device in use (its filesystem may be mounted): "
                                       "follow completed writes through block "
                                       "tracepoints, read them from the device, cut a "
                                       "consistency point every --cut-interval by freezing "
                                       "the filesystem; until SIGTERM/SIGINT."),
            freeze: str = typer.Option(None, "--freeze", metavar="MOUNTPOINT|none",
                                       help="With --trace: the filesystem to freeze at each "
                                       "cut (default: where the device is mounted, from "
                                       "/proc/self/mountinfo); 'none': never freeze."),
            freeze_cap: float = typer.Option(2.0, "--freeze-cap", metavar="SECONDS",
                                             help="With --trace: abandon a cut (thaw, no "
                                             "consistency point) frozen this long."),
            trace_buffer_kb: int = typer.Option(8192, "--trace-buffer-kb", metavar="KB",
                                                help="With --trace: the trace buffer per "
                                                "CPU; events lost to an overrun are "
                                                "repaired by a hash compare."),
            json_: bool = typer.Option(False, "--json", help="Print results as JSON lines."),
            accept_spec_change: bool = typer.Option(
                False, "--accept-spec-change", help="The pair's source, target or key id "
                "changed on the control topic on purpose: pin the new ones on this host.")
            ) -> None:
    """Capture a pair's source into its journal: by scanning for changed blocks, live
    over NBD with --nbd, or live from a block device in use with --trace."""
    if trace and (nbd is not None or once or interval):
        raise BadInput("--trace runs the trace capturer; --nbd, --once and --interval belong "
                       "to other capturers: pick one")
    if not trace and (freeze is not None or freeze_cap != 2.0 or trace_buffer_kb != 8192):
        raise BadInput("--freeze, --freeze-cap and --trace-buffer-kb only apply to the trace "
                       "capturer: add --trace")
    if trace:
        from producers.trace import DEFAULT_CUT_INTERVAL
        cut_interval = DEFAULT_CUT_INTERVAL if cut_interval is None else cut_interval
        if cut_interval <= 0 or freeze_cap <= 0 or trace_buffer_kb <= 0:
            raise BadInput("--cut-interval, --freeze-cap and --trace-buffer-kb must be "
                           "positive")
    if nbd is not None and (once or interval):
        raise BadInput("--nbd runs a long-lived NBD capturer; --once and --interval belong "
                       "to the scan capturer: drop one or the other")
    if (mode is not None or tls is not None or tls_certificates or on_fence
            or (cut_interval is not None and not trace)) and nbd is None:
        raise BadInput("--mode, --cut-interval, --tls and --on-fence only apply to the NBD "
                       "capturer: add --nbd [HOST:]PORT|PATH (--cut-interval also to --trace)")
    if nbd is not None and cut_interval is not None and not 0 <= cut_interval <= 3600:
        raise BadInput(f"--cut-interval must be seconds from 0 to 3600 (0: only client "
                       f"FLUSHes), got {cut_interval:g}")
    if once and interval:
        raise BadInput("--once and --interval exclude each other: pick one")
    if interval < 0:
        raise BadInput(f"--interval must be positive, got {interval}")
    if nbd is not None:
        listen = parse_listen(nbd)
        mode_ = Mode.parse(mode or "async")
        tls_mode = TLSMode.parse(tls or ("on" if tls_certificates else "off"))
        if tls_mode is not TLSMode.OFF and not tls_certificates:
            raise BadInput(f"--tls {tls_mode.value} needs --tls-certificates DIR (make one "
                           f"with 'x2x nbd-certs DIR --host HOST')")
        tls_ctx = server_context(tls_certificates) if tls_mode is not TLSMode.OFF else None
    s = settings(ctx)
    remember_file(key_file)
    st = control.get_pair(s, name)
    if st.group:
        raise BadInput(f"pair {name} belongs to group {st.group}: its journal needs the "
                       f"group's cuts, so capture it with the rest of the group: 'x2x group "
                       f"capture {st.group} --nbd PORT' (or take it out first: 'x2x group "
                       f"remove {st.group} --pair {name}')")
    pins.check(st.spec, accept_spec_change)
    spec = st.active_spec             # after a failover: the promoted side
    if nbd is not None and images.locate(spec.source).kind != "local":
        raise BadInput(f"the NBD capturer serves a local raw file or block device; the "
                       f"source {spec.source} is not one: capture it by scanning "
                       f"('x2x capture {name} --once' or --interval SECONDS)")
    store = prepare_capture(st, rebaseline)
    stop = _stop_on_signals()
    if trace:
        _capture_trace(spec, s, store, stop, json_, key_for(spec, key_file), cut_interval,
                       "" if freeze == "none" else freeze, freeze_cap, trace_buffer_kb)
        return
    if nbd is not None:
        _capture_nbd(spec, s, store, listen, mode_, stop, json_, key_for(spec, key_file),
                     tls_ctx, tls_mode is TLSMode.REQUIRE,
                     CUT_INTERVAL if cut_interval is None else cut_interval, on_fence)
        return
    while True:
        show = not json_ and sys.stderr.isatty()
        with _progress(show) as bar:
            task = bar.add_task("scanning", total=spec.volume_size)
            result = scan_once(spec, s, store, progress=lambda n: bar.advance(task, n),
                               key=key_for(spec, key_file),
                               link=control.get_pair(s, name).link)   # each scan: the newest
        _print_scan(result, json_)
        if not interval or stop.wait(interval):
            return


def _capture_nbd(spec: PairSpec, s: KafkaSettings, store: StateStore,
                 listen: Listen, mode: Mode, stop: threading.Event, json_: bool,
                 key: JournalKey | None, tls: ssl.SSLContext | None,
                 tls_required: bool, cut_interval: float, on_fence: str | None = None) -> None:
    """Run the NBD capturer until ``stop``; the service does the work, this prints."""
    cap = NBDCapture(spec, s, listen.host, listen.port, mode, store, key, tls=tls,
                     tls_required=tls_required, cut_interval=cut_interval,
                     on_fence=on_fence, path=listen.path).start()
    r = cap.report
    what = ("same epoch" if not r.new_epoch else "new epoch, baseline running"
            if r.resend_bytes is None else
            f"new epoch, resending {r.resend_bytes} marked bytes")
    if r.journal_lost:
        what += (f"; the journal lost its history: resync the target with 'x2x pair resync "
                 f"{spec.name}'")
    if tls is not None:
        what += ", TLS required" if tls_required else ", TLS offered"
    if cap.lease is not None:
        what += (f"; automatic failover: holding a {cap.lease.lease_s:g} s lease, writes "
                 f"stop if it lapses")
    if json_:
        print_json({"event": "serving", "uri": cap.uri, "epoch": r.epoch,
                    "first_seq": r.first_seq, "mode": mode.value, "new_epoch": r.new_epoch,
                    "resend_bytes": r.resend_bytes, "journal_lost": r.journal_lost})
    else:
        console.print(f"serving {cap.uri} ({mode.value} mode); epoch {r.epoch} from seq "
                      f"{r.first_seq} ({what}); stop with SIGTERM or Ctrl-C", highlight=False)
    sys.stdout.flush()
    r = cap.serve(stop)
    if json_:
        print_json({"event": "stopped", **r.__dict__})
    else:
        how = "clean" if r.clean else f"UNCLEAN ({r.error or 'baseline not finished'}); the " \
            f"next start begins a new epoch resending the marked blocks"
        console.print(f"stopped ({how}): epoch {r.epoch} seq {r.first_seq}..{r.last_seq}; "
                      f"captured {r.ops} client ops, {human_bytes(r.bytes)} in "
                      f"{r.seconds:.1f} s", highlight=False)
    if r.error:
        raise BrokerError(f"pair {spec.name}: journaling failed: {r.error}")


def _capture_trace(spec: PairSpec, s: KafkaSettings, store: StateStore,
                   stop: threading.Event, json_: bool, key: JournalKey | None,
                   cut_interval: float, freeze: str | None, freeze_cap: float,
                   buffer_kb: int) -> None:
    """Run the trace capturer until ``stop``; the service does the work, this prints."""
    from producers.trace import TraceCapture
    cap = TraceCapture(spec, s, store, key, cut_interval, freeze, freeze_cap,
                       buffer_kb).start()
    r = cap.report
    what = ("baseline" if r.baseline else "comparing by block hashes") + (
        ", new epoch" if r.new_epoch else ", same epoch")
    frz = (f"freezing {r.mount_point} at each cut (cap {freeze_cap:g} s)" if r.mount_point
           else "no filesystem frozen: cuts are not crash-consistent unless the "
                "application quiesces")
    if json_:
        print_json({"event": "tracing", "source": spec.source, "epoch": r.epoch,
                    "first_seq": r.first_seq, "baseline": r.baseline,
                    "mount_point": r.mount_point, "new_epoch": r.new_epoch})
    else:
        console.print(f"tracing {spec.source}; epoch {r.epoch} from seq {r.first_seq} "
                      f"({what}); {frz}; a cut every {cut_interval:g} s; stop with SIGTERM "
                      f"or Ctrl-C", highlight=False)
    sys.stdout.flush()
    r = cap.run(stop)
    if json_:
        print_json({"event": "stopped", **r.__dict__})
        return
    how = "clean" if r.clean else "UNCLEAN; the next start begins a new epoch"
    console.print(f"stopped ({how}): epoch {r.epoch} seq {r.first_seq}..{r.last_seq}; "
                  f"{r.cuts} cuts ({r.cuts_abandoned} abandoned), freeze p50 "
                  f"{r.freeze_p50_ms:.1f} ms, p99 {r.freeze_p99_ms:.1f} ms, max "
                  f"{r.freeze_max_ms:.1f} ms; {r.lost_events} trace events lost, "
                  f"{r.compares} hash compares; sent {human_bytes(r.bytes_sent)} in "
                  f"{r.seconds:.1f} s", highlight=False)


def _print_scan(r: ScanResult, json_: bool) -> None:
    if json_:
        print_json(r.__dict__)
        return
    kind = "baseline" if r.baseline else "incremental scan"
    rate = r.bytes_sent / r.seconds / 1e6 if r.seconds else 0.0
    console.print(
        f"{kind}: epoch {r.epoch} seq {r.first_seq}..{r.last_seq}; {r.blocks_changed} of "
        f"{r.blocks_scanned} blocks changed ({human_bytes(r.bytes_changed)}); sent "
        f"{human_bytes(r.bytes_sent)} to the journal in {r.seconds:.2f} s ({rate:.0f} MB/s)")


def apply(ctx: typer.Context, name: str,
          target: str = typer.Option(None, help="Target volume (default: the pair's target)."),
          until_caught_up: bool = typer.Option(False, help="Exit once every consistency "
                                               "point the capturer journaled is applied."),
          reset: bool = typer.Option(False, help="Forget this target's checkpoint and replay "
                                     "the journal from its start."),
          reseed: bool = typer.Option(False, "--reseed", help="Start again from a copy of the "
                                      "history base (a target that fell behind it)."),
          base: str = typer.Option(None, help="With --reseed: the history base's volume "
                                   "(default: the base running on this host)."),
          key_file: str = typer.Option(None, help="The pair's key file, if it is encrypted "
                                       "(default $X2X_HOME/keys/NAME.key)."),
          json_: bool = typer.Option(False, "--json", help="Print the result as JSON."),
          accept_spec_change: bool = typer.Option(
              False, "--accept-spec-change", help="The pair's source, target or key id "
              "changed on the control topic on purpose: pin the new ones on this host.")
          ) -> None:
    """Apply a pair's journal to its target, from the target's checkpoint."""
    s = settings(ctx)
    remember_file(key_file)
    st = control.get_pair(s, name)
    pins.check(st.spec, accept_spec_change)
    spec = st.active_spec
    target = apply_target(st, target)
    store = CheckpointStore(name, target)
    if reset:
        store.reset()
    if reseed:
        from consumers.seed import find_base, seed
        cp = seed(spec, base or find_base(s, name), target, s)
        err_console.print(f"seeded {target} from the history base at epoch "
                          f"{cp.position.epoch} seq {cp.position.seq} (offset "
                          f"{cp.position.offset})", highlight=False)
    applier = Applier(spec, target, s, key=key_for(spec, key_file), store=store)
    stop = _stop_on_signals()
    stats = applier.run(until_caught_up=until_caught_up, stop=stop)
    p = applier.checkpointed
    if json_:
        print_json({**stats.__dict__, "epoch": p.epoch, "seq": p.seq, "offset": p.offset})
        return
    rate = stats.bytes_applied / stats.seconds / 1e6 if stats.seconds else 0.0
    console.print(
        f"applied {stats.entries} entries, {stats.ops} ops, {human_bytes(stats.bytes_applied)} "
        f"in {stats.seconds:.2f} s ({rate:.0f} MB/s; {disk_share(stats)}); checkpoint epoch "
        f"{p.epoch} seq {p.seq} (offset {p.offset})")


def nbd_certs(directory: str = typer.Argument(..., metavar="DIR"),
              host: list[str] = typer.Option(["localhost", "127.0.0.1"], "--host",
                                             help="A name or address clients connect to "
                                             "(repeat for several).")) -> None:
    """Make a private CA, a server and a client certificate for NBD over TLS, in DIR (the
    layout of qemu and libnbd; keys mode 0600)."""
    for path in create_certificates(directory, host):
        console.print(f"wrote {path}", highlight=False)
    console.print(f"serve with: x2x capture NAME --nbd PORT --tls require "
                  f"--tls-certificates {directory}", highlight=False)
    console.print(f"clients: nbdinfo 'nbds://{host[0]}:PORT/NAME?tls-certificates="
                  f"{directory}' (copy ca-cert.pem, client-cert.pem and client-key.pem to "
                  f"client hosts; keep ca-key.pem offline)", highlight=False)
