"""Where a pair's volume lives (infra/images.py) and what an NBD URI names (nbd/client.py)."""
from __future__ import annotations

import pytest

from infra.images import Location, locate
from journal.errors import BadInput
from nbd.client import Address, is_uri, parse_uri


@pytest.mark.parametrize("text, loc", [
    ("/dev/sdb", Location("local", "/dev/sdb")),
    ("/images/web.img", Location("local", "/images/web.img")),
    ("web.qcow2", Location("image", "web.qcow2", "qcow2")),
    ("WEB.VMDK", Location("image", "WEB.VMDK", "vmdk")),
    ("w.vhdx", Location("image", "w.vhdx", "vhdx")),
    ("w.vdi", Location("image", "w.vdi", "vdi")),
    ("w.vhd", Location("image", "w.vhd", "vpc")),
    ("qcow2:/images/web.img", Location("image", "/images/web.img", "qcow2")),
    ("raw:/images/web.qcow2", Location("local", "/images/web.qcow2", "raw")),
    ("nbd://h:10810/e", Location("nbd", "nbd://h:10810/e")),
])
def test_locate(text, loc):
    assert locate(text) == loc
    assert locate(loc.text) == loc          # what a spec carries reads back the same


def test_format_flag_overrides_the_extension_and_is_kept_in_the_text():
    assert locate("/i/web.img", "qcow2").text == "qcow2:/i/web.img"
    assert locate("/i/web.qcow2", "qcow2").text == "/i/web.qcow2"
    assert locate("/i/web.img", "vhd").text == "vhd:/i/web.img"


@pytest.mark.parametrize("text, fmt, words", [
    ("/i/a.img", "qcow3", "unknown disk format 'qcow3'"),
    ("nbd://h/e", "qcow2", "drop --target-format"),
    ("nbd+unix:///e", None, "needs ?socket=PATH"),
    ("nbd:///e", None, "no host"),
    ("nbd://h:port/e", None, "port is not a number"),
])
def test_bad_locations(text, fmt, words):
    with pytest.raises(BadInput, match=words.replace("?", r"\?")):
        locate(text, fmt)


def test_uris():
    assert parse_uri("nbd://10.0.0.1/web") == Address("web", "10.0.0.1", 10809)
    assert parse_uri("nbds://h:1234/a%20b?tls-certificates=/c") == Address(
        "a b", "h", 1234, tls=True, certificates="/c")
    assert parse_uri("nbd+unix:///e?socket=/run/s") == Address("e", socket_path="/run/s")
    assert parse_uri("nbd://h") == Address("", "h", 10809)
    assert is_uri("nbds://h/e") and not is_uri("/dev/nbd0") and not is_uri("qcow2:/x")
