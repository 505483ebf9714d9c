"""A small bootable Linux guest built from Debian packages, for cutover tests and bench.

- the kernel: Debian's ``linux-image-amd64`` (the .deb, fetched once with ``apt-get
  download`` into a cache, unpacked with ``dpkg-deb``);
- an initramfs: the static busybox of ``busybox-static``, the modules that reach a virtio
  disk with ext4 on it (their ``depends=`` resolved from the .ko files), and an /init that
  mounts /dev/vda (ext4) and runs ``/x2x-boot.sh`` from it, then powers off;
- a system disk: a raw ext4 image (``mkfs.ext4 -d``) whose ``x2x-boot.sh`` writes
  ``X2X-GUEST-UP <token>`` to the serial console, the token read from the disk itself, so
  a marker on the console proves which disk contents booted.
"""
from __future__ import annotations

import glob
import gzip
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MARKER = "X2X-GUEST-UP"
#: What a virtio disk with ext4 needs from a Debian kernel that builds all of it as modules.
WANTED = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
CACHE = Path(os.environ.get("X2X_GUEST_CACHE", "/var/tmp/x2x-guest"))

_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /mnt /bin /sbin
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in {modules}; do insmod /lib/modules/$m.ko; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 /dev/vda /mnt; then
  sh /mnt/x2x-boot.sh
  sync
  umount /mnt
else
  echo "X2X-GUEST-FAILED: no ext4 on /dev/vda" > /dev/console
fi
poweroff -f
"""

_BOOT_SH = f"""#!/bin/sh
echo "{MARKER} $(cat /mnt/token)" > /dev/console
"""


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd: Path

    def boot_args(self) -> list[str]:
        """What `x2x cutover` takes to boot the system disk with this kernel."""
        return ["--kernel", str(self.kernel), "--initrd", str(self.initrd),
                "--append", "console=ttyS0 panic=-1 quiet"]


def missing() -> str | None:
    """Why the guest cannot be built here, or None."""
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("dpkg-deb", "dpkg"),
                          ("apt-get", "apt"), ("mkfs.ext4", "e2fsprogs"),
                          ("debugfs", "e2fsprogs")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    if _busybox() is None:
        return "busybox-static is not installed (apt-get install busybox-static)"
    return None


def _busybox() -> str | None:
    """A statically linked busybox (busybox-static): no dynamic loader named in its head."""
    for path in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(path):
            with open(path, "rb") as f:
                if b"ld-linux" not in f.read(4096):
                    return path
    return None


def _kernel_deb() -> Path:
    """The Debian kernel .deb, downloaded once into CACHE (setup-system.sh does it first)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob("linux-image-*-amd64_*.deb"))
    if found:
        return found[-1]
    names: list[str] = []
    for _ in range(2):      # without apt lists apt-cache knows nothing: update once
        dep = subprocess.run(["apt-cache", "depends", "linux-image-amd64"],
                             capture_output=True, text=True).stdout
        names = [ln.split(":", 1)[1].strip() for ln in dep.splitlines()
                 if ln.strip().startswith("Depends: linux-image-")]
        if names:
            break
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
    subprocess.run(["apt-get", "download", names[0]], cwd=CACHE, check=True,
                   capture_output=True)
    return sorted(CACHE.glob("linux-image-*-amd64_*.deb"))[-1]


def _depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    i = data.find(b"\0depends=")
    if i < 0:
        return []
    raw = data[i + 9:data.index(b"\0", i + 9)].decode()
    return [d for d in raw.split(",") if d]


def _load_order(moddir: Path, wanted: tuple[str, ...]) -> list[Path]:
    index = {p.name[:-3].replace("-", "_"): p for p in moddir.rglob("*.ko")}
    order: list[Path] = []

    def visit(name: str) -> None:
        ko = index[name.replace("-", "_")]
        if ko in order:
            return
        for dep in _depends(ko):
            visit(dep)
        order.append(ko)
    for name in wanted:
        visit(name)
    return order


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) entries (directories have no data)."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, ino: int) -> None:
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))
    for ino, (name, mode, data) in enumerate(entries, 1):
        add(name, mode, data, ino)
    add("TRAILER!!!", 0, b"", 0)
    return bytes(out)


def build(workdir: Path) -> Guest:
    """Kernel and initramfs in ``workdir`` (the kernel .deb cached across runs)."""
    workdir.mkdir(parents=True, exist_ok=True)
    unpacked = workdir / "deb"
    if not unpacked.exists():
        subprocess.run(["dpkg-deb", "-x", str(_kernel_deb()), str(unpacked)], check=True)
    kernel = Path(glob.glob(str(unpacked / "boot" / "vmlinuz-*"))[0])
    moddir = Path(glob.glob(str(unpacked / "lib" / "modules" / "*"))[0])
    modules = _load_order(moddir, WANTED)
    names = [m.name[:-3] for m in modules]
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o40755, b""), ("lib", 0o40755, b""), ("lib/modules", 0o40755, b""),
        ("dev", 0o40755, b""), ("proc", 0o40755, b""), ("sys", 0o40755, b""),
        ("mnt", 0o40755, b""),
        ("bin/busybox", 0o100755, Path(_busybox() or "/bin/busybox").read_bytes()),
        ("init", 0o100755, _INIT.format(modules=" ".join(names)).encode()),
    ]
    entries += [(f"lib/modules/{m.name}", 0o100644, m.read_bytes()) for m in modules]
    initrd = workdir / "initrd.gz"
    initrd.write_bytes(gzip.compress(_cpio_newc(entries), 1))
    return Guest(kernel, initrd)


def system_disk(path: Path, size: int, token: str, payload: int = 0) -> Path:
    """A raw ext4 image holding x2x-boot.sh and ``token`` (and ``payload`` bytes of
    random data in payload.bin, for a disk with something on it)."""
    root = path.parent / (path.name + ".root")
    root.mkdir(exist_ok=True)
    (root / "x2x-boot.sh").write_text(_BOOT_SH)
    (root / "token").write_text(token + "\n")
    if payload:
        with open(root / "payload.bin", "wb") as f:
            for _ in range(0, payload, 1 << 20):
                f.write(os.urandom(min(1 << 20, payload)))
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(path)], check=True)
    shutil.rmtree(root)
    return path


def set_token(disk: Path, token: str) -> None:
    """Change the token on an unmounted system disk (debugfs, no mount needed)."""
    tmp = disk.parent / "token.new"
    tmp.write_text(token + "\n")
    subprocess.run(["debugfs", "-w", "-R", "rm /token", str(disk)], check=True,
                   capture_output=True)
    subprocess.run(["debugfs", "-w", "-R", f"write {tmp} token", str(disk)], check=True,
                   capture_output=True)
    tmp.unlink()
