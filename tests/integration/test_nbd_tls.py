"""NBD over TLS (NBD_OPT_STARTTLS) with x509 certificates made by ``x2x nbd-certs``:
real TLS clients (nbdinfo, qemu-io, nbdcopy) read and write; a server that requires TLS
refuses plain-text clients per the protocol; a client whose certificate another CA signed
is refused; a bad certificate directory is a clear error. Each refusal leaves the server
serving everyone else."""
from __future__ import annotations

import json
import logging
import os
import shutil
import ssl
from pathlib import Path
from typing import Iterator

import pytest

from infra.tls import create_certificates, server_context
from nbd import proto as p
from tests.conftest import run_x2x
from tests.integration.test_nbd_server import (HOST, LOGGER, MiB, RawClient, Served,
                                               image_bytes, logged, run, serve)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    create_certificates(d, ["localhost", HOST])
    return d


def tls_served(tmp_path: Path, certs: Path, required: bool) -> Served:
    return serve(tmp_path, {"disk": (0, 4 * MiB)}, size=4 * MiB, tls=server_context(certs),
                 tls_required=required)


@pytest.fixture
def required(tmp_path: Path, certs: Path) -> Iterator[Served]:
    served = tls_served(tmp_path, certs, required=True)
    yield served
    served.server.stop(5)


def tls_uri(srv: Served, certs: Path) -> str:
    return f"nbds://localhost:{srv.server.port}/disk?tls-certificates={certs}"


def qemu_io_tls(srv: Served, certs: Path, *cmds: str) -> str:
    args = ["qemu-io", "--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client",
            "--image-opts", f"driver=nbd,host=localhost,port={srv.server.port},export=disk,"
            f"tls-creds=tls0"]
    for c in cmds:
        args += ["-c", c]
    out = run(*args)
    assert "failed" not in out.stdout + out.stderr, out.stdout + out.stderr
    return out.stdout


def test_real_clients_read_and_write_over_tls(required: Served, certs: Path,
                                              tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    info = json.loads(run("nbdinfo", "--json", tls_uri(required, certs)).stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 4 * MiB
    qemu_io_tls(required, certs, "write -P 0x5a 64k 128k", "flush", "read -P 0x5a 64k 128k")
    assert image_bytes(required.image, 64 * 1024, 128 * 1024) == b"\x5a" * 128 * 1024
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(2 * MiB))
    run("nbdcopy", str(blob), tls_uri(required, certs))
    assert image_bytes(required.image, 0, 2 * MiB) == blob.read_bytes()
    assert "TLS established (TLSv1." in logged(caplog, "TLS established")


def test_required_tls_refuses_plain_text_clients_per_the_protocol(
        required: Served, certs: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    plain = run("nbdinfo", f"nbd://{HOST}:{required.server.port}/disk", check=False)
    assert plain.returncode != 0
    assert "TLS is required" in logged(caplog, "NBD_OPT_GO refused")
    c = RawClient(required.server.port)
    try:           # every option but STARTTLS and ABORT: NBD_REP_ERR_TLS_REQD
        assert c.option(p.Option.LIST) == [(p.Reply.ERR_TLS_REQD, b"")]
        assert c.option(p.Option.GO, p.encode_info_request("disk")) == [
            (p.Reply.ERR_TLS_REQD, b"")]
        assert c.option(p.Option.STARTTLS, b"x") == [(p.Reply.ERR_INVALID, b"")]
    finally:
        c.close()
    c = RawClient(required.server.port)
    try:           # EXPORT_NAME has no error reply: the connection is closed
        c.sock.sendall(p.encode_option_request(p.Option.EXPORT_NAME, b"disk"))
        c.assert_closed_by_server()
    finally:
        c.close()
    assert "EXPORT_NAME before NBD_OPT_STARTTLS" in logged(caplog, "EXPORT_NAME before")
    assert json.loads(run("nbdinfo", "--json", tls_uri(required, certs)).stdout)["TLS"]


def test_offered_tls_serves_both_kinds_of_client(tmp_path: Path, certs: Path) -> None:
    srv = tls_served(tmp_path, certs, required=False)
    try:
        assert not json.loads(run("nbdinfo", "--json", srv.uri()).stdout)["TLS"]
        assert json.loads(run("nbdinfo", "--json", tls_uri(srv, certs)).stdout)["TLS"]
    finally:
        srv.server.stop(5)


def test_client_certificate_of_another_ca_is_refused(required: Served, certs: Path,
                                                     tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    stranger = tmp_path / "stranger"
    create_certificates(stranger, ["localhost"])
    # The stranger trusts our server's CA, but its own certificate was signed by another.
    shutil.copy(certs / "ca-cert.pem", stranger / "ca-cert.pem")
    out = run("nbdinfo", tls_uri(required, stranger), check=False)
    assert out.returncode != 0
    assert "TLS handshake failed" in logged(caplog, "TLS handshake failed")
    assert json.loads(run("nbdinfo", "--json", tls_uri(required, certs)).stdout)["TLS"]


def test_bad_tls_settings_are_clear_errors(tmp_path: Path, certs: Path) -> None:
    with pytest.raises(Exception, match="lacks server-cert.pem, server-key.pem"):
        server_context(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    for name in ("server-cert.pem", "server-key.pem"):
        (tmp_path / "broken" / name).write_text("not a certificate")
    with pytest.raises(Exception, match="cannot be used"):
        server_context(tmp_path / "broken")
    with pytest.raises(Exception, match="already holds ca-cert.pem"):
        create_certificates(certs, ["localhost"])
    assert (os.stat(certs / "server-key.pem").st_mode & 0o777) == 0o600
    assert isinstance(server_context(certs), ssl.SSLContext)
    for args, message in (
            (["--tls", "maybe"], "--tls 'maybe' is invalid"),
            (["--tls", "require"], "needs --tls-certificates DIR"),
            (["--tls-certificates", str(tmp_path / "empty")], "lacks server-cert.pem")):
        proc = run_x2x("capture", "no-such-pair", "--nbd", "10999", *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    proc = run_x2x("capture", "no-such-pair", "--tls", "on", check=False)
    assert proc.returncode != 0 and "add --nbd" in proc.stderr, proc.stderr


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_capturer_over_tls_journals_what_a_tls_client_writes(settings, pair_name,
                                                              tmp_path: Path, certs: Path,
                                                              transport: str) -> None:
    from producers.nbd_capture import NBDCapture
    from tests.conftest import same_bytes
    from tests.integration.test_nbd_capture import make_pair, wait_baseline
    spec = make_pair(settings, pair_name, tmp_path, 8 * MiB, data_fraction=0.3)
    path = str(tmp_path / "tls.sock") if transport == "unix" else None
    cap = NBDCapture(spec, settings, HOST, 0, tls=server_context(certs),
                     tls_required=True, path=path).start()
    try:
        if path is None:
            assert cap.uri.startswith("nbds://")
            uri = f"nbds://localhost:{cap.port}/{pair_name}?tls-certificates={certs}"
        else:
            # TLS on a unix socket too: libnbd checks the certificate for "localhost".
            assert cap.uri.startswith("nbds+unix:///")
            uri = f"{cap.uri}&tls-certificates={certs}"
        wait_baseline(cap)
        blob = tmp_path / "blob"
        blob.write_bytes(os.urandom(3 * MiB))
        run("nbdcopy", "--flush", str(blob), uri)
    finally:
        assert cap.stop().clean
    run_x2x("apply", pair_name, "--until-caught-up")
    assert same_bytes(spec.source, spec.target)
