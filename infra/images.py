"""Where a volume lives: a raw file or block device, a disk image in another format, or
an NBD export; and the qemu-nbd that x2x runs for images.

A pair's source or target is a string (it is what the control topic carries and what
hosts pin): a path, a path whose extension names an image format (``disk.qcow2``), a
path with the format in front when the extension does not say it (``qcow2:disk.img``),
or an NBD URI (``nbd://host:port/export``, ``nbds://`` for TLS, ``nbd+unix:///export?
socket=PATH``). Raw files and devices are written directly (infra/volume.py); images
through a qemu-nbd on a private unix socket, started for as long as the volume is open;
NBD URIs through :mod:`nbd.client`.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

from journal.errors import BadInput, VolumeError, VolumeLost
from nbd import client as nbd
from nbd import proto

#: Formats x2x writes, by the name users give (qemu's name may differ: VHD is ``vpc``).
FORMATS = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhdx": "vhdx", "vdi": "vdi",
           "vhd": "vpc", "vpc": "vpc"}
_EXTENSIONS = {".qcow2": "qcow2", ".vmdk": "vmdk", ".vhdx": "vhdx", ".vdi": "vdi",
               ".vhd": "vpc"}
#: qemu-img create options per format: VHD keeps the exact size asked for.
_CREATE_OPTIONS = {"vpc": ["-o", "force_size=on"]}
_QEMU_HINT = "install qemu-utils (Debian: apt-get install qemu-utils)"
START_TIMEOUT = 15.0


@dataclass(frozen=True)
class Location:
    """``kind``: ``local`` (raw file or block device), ``image`` (a file in ``fmt``, served
    by qemu-nbd) or ``nbd`` (``path`` is the URI)."""

    kind: str
    path: str
    fmt: str = "raw"

    @property
    def text(self) -> str:
        """The string a pair spec carries for this location."""
        if self.kind == "nbd":
            return self.path
        if _EXTENSIONS.get(os.path.splitext(self.path)[1].lower(), "raw") == self.fmt:
            return self.path
        return f"{_user_name(self.fmt)}:{self.path}"


def _user_name(fmt: str) -> str:
    return "vhd" if fmt == "vpc" else fmt


def locate(text: str, fmt: str | None = None) -> Location:
    """Where ``text`` (a pair's source or target) lives; ``fmt`` overrides the format the
    extension implies. Raises BadInput for an unknown format or a malformed NBD URI."""
    if nbd.is_uri(text):
        if fmt is not None:
            raise BadInput(f"{text} is an NBD export: its server decides the format, so "
                           f"drop --target-format")
        try:
            nbd.parse_uri(text)
        except ValueError as e:
            raise BadInput(str(e)) from None
        return Location("nbd", text)
    prefix, sep, rest = text.partition(":")
    if sep and prefix.lower() in FORMATS and rest:
        text, fmt = rest, fmt or prefix
    if fmt is not None:
        qfmt = FORMATS.get(fmt.lower())
        if qfmt is None:
            raise BadInput(f"unknown disk format {fmt!r}: x2x writes "
                           f"{', '.join(sorted(set(FORMATS) - {'vpc'}))}")
    else:
        qfmt = _EXTENSIONS.get(os.path.splitext(text)[1].lower(), "raw")
    return Location("local" if qfmt == "raw" else "image", text, qfmt)


def _tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise VolumeError(f"{why} needs {name}, which is not installed: {_QEMU_HINT}")
    return path


def image_info(loc: Location) -> dict:
    """``qemu-img info`` of an image file (its format and virtual size)."""
    qemu_img = _tool("qemu-img", f"the {_user_name(loc.fmt)} image {loc.path}")
    r = subprocess.run([qemu_img, "info", "--output=json", "-U", loc.path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise VolumeError(f"cannot read image {loc.path}: {r.stderr.strip()}")
    return json.loads(r.stdout)


def check_format(loc: Location) -> None:
    """An existing image must be in the format its name (or --target-format) says."""
    if loc.kind != "image" or not os.path.exists(loc.path):
        return
    found = image_info(loc).get("format")
    if found != loc.fmt:
        raise BadInput(f"{loc.path} holds a {found} image, not {_user_name(loc.fmt)}: give "
                       f"--target-format {_user_name(found or 'raw')}, or another file name")


def size(loc: Location) -> int:
    """The size in bytes of the volume at ``loc`` (as a guest would see it)."""
    if loc.kind == "local":
        from infra.volume import volume_size
        return volume_size(loc.path)
    if loc.kind == "image":
        if not os.path.exists(loc.path):
            raise VolumeError(f"image {loc.path} does not exist; create it (--create-target) "
                              f"or check the path")
        return int(image_info(loc)["virtual-size"])
    with open_nbd(loc.path) as c:
        return c.size


def create(loc: Location, nbytes: int) -> bool:
    """Create a missing target of ``nbytes``: a sparse raw file, or an empty image with
    qemu-img. Returns True if it created one (False: it was there already)."""
    if loc.kind == "nbd":
        raise BadInput(f"{loc.path} is an NBD export: its server owns it, x2x cannot create "
                       f"it; drop --create-target")
    if os.path.exists(loc.path):
        return False
    if loc.kind == "local":
        with open(loc.path, "wb") as f:
            f.truncate(nbytes)
        return True
    qemu_img = _tool("qemu-img", f"creating the {_user_name(loc.fmt)} image {loc.path}")
    r = subprocess.run([qemu_img, "create", "-q", "-f", loc.fmt,
                        *_CREATE_OPTIONS.get(loc.fmt, []), loc.path, str(nbytes)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        if os.path.exists(loc.path):
            os.unlink(loc.path)
        raise VolumeError(f"qemu-img could not create {loc.path}: {r.stderr.strip()}")
    return True


def _accepts(path: str) -> bool:
    """Does the unix socket at ``path`` take connections? (qemu-nbd creates the socket
    file a moment before it listens on it.)"""
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def open_nbd(uri: str, timeout: float = 30.0) -> nbd.Client:
    try:
        address = nbd.parse_uri(uri)
    except ValueError as e:
        raise BadInput(str(e)) from None
    try:
        return nbd.Client.open(address, timeout)
    except nbd.Disconnected as e:
        raise VolumeLost(str(e)) from None        # may come back: the applier retries
    except (nbd.NBDError, proto.ProtocolError) as e:
        raise VolumeError(str(e)) from None


class ImageServer:
    """qemu-nbd serving one image file on a private unix socket, until :meth:`stop`.

    Zeros stay thin (``--discard=unmap --detect-zeroes=unmap``: a WRITE_ZEROES or an
    all-zero write deallocates); a FLUSH reaches the disk (writeback cache, flushed)."""

    def __init__(self, loc: Location, writable: bool) -> None:
        self.loc, self.writable = loc, writable
        self.proc: subprocess.Popen | None = None
        self._dir = ""

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={os.path.join(self._dir, 'nbd.sock')}"

    def start(self) -> "ImageServer":
        qemu_nbd = _tool("qemu-nbd", f"the {_user_name(self.loc.fmt)} image {self.loc.path}")
        if not os.path.exists(self.loc.path):
            raise VolumeError(f"image {self.loc.path} does not exist; create it "
                              f"(x2x pair create ... --create-target) or check the path")
        self._dir = self._dir or tempfile.mkdtemp(prefix="x2x-qemu-nbd-")
        sock = os.path.join(self._dir, "nbd.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        args = [qemu_nbd, "--format", self.loc.fmt, "--socket", sock, "--persistent",
                "--shared", "4", "--cache", "writeback", "--aio", "threads"]
        args += (["--discard", "unmap", "--detect-zeroes", "unmap"] if self.writable
                 else ["--read-only"])
        self.proc = subprocess.Popen(args + [self.loc.path], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while not _accepts(sock):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip()
                self.stop()
                raise VolumeError(f"qemu-nbd could not open {self.loc.path}: {err} (is it "
                                  f"open in another program, e.g. a running VM?)")
            if time.monotonic() > deadline:
                self.stop()
                raise VolumeError(f"qemu-nbd did not serve {self.loc.path} within "
                                  f"{START_TIMEOUT:.0f} s")
            time.sleep(0.02)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is not None:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if p.stderr:
                p.stderr.close()

    def close(self) -> None:
        self.stop()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""
