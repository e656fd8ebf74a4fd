"""Build the VM lane's guest: a Debian kernel and a busybox initramfs.

usage: python tests/vm/builder.py [--cache DIR] [--force]

Artefacts go to ``.cache/vm/`` (git ignores it; ``OOMWARDEN_VM_CACHE`` or
``--cache`` moves it):

* ``vmlinux``: the kernel of Debian's ``linux-image-amd64``, decompressed from
  its bzImage to the ELF image when that carries a PVH entry note (qemu then
  boots it directly, ~2 s faster than through the bzImage's decompressor);
  else ``bzImage``, the file as shipped.
* ``initramfs.cpio``: ``/init`` (``init.sh`` beside this file), a static
  busybox, and the modules the guest needs to mount the host's filesystems
  (virtio PCI, the 9p transport and filesystem, overlayfs), with their
  dependencies read from each module's own ``.modinfo``: the package ships no
  ``modules.dep`` (``depmod`` makes it at install time).
* ``stamp.json``: what was built, and a hash of the builder's inputs (this
  file and ``init.sh``): a stamp that does not match means a rebuild.

The downloaded ``.deb`` files stay in ``downloads/``. Nothing is installed on
the host by the build itself (the packages are unpacked with ``dpkg -x``); the
runner installs qemu when it is missing (:func:`ensure_qemu`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent.parent
INIT_SCRIPT = HERE / "init.sh"
#: The files whose content decides what is built.
INPUTS = (Path(__file__).resolve(), INIT_SCRIPT)

KERNEL_META = "linux-image-amd64"
BUSYBOX = "busybox-static"
QEMU = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
#: Modules the guest loads, in no particular order: their dependencies are
#: added and everything is sorted so that a module comes after what it needs.
#: Those built into the kernel (``modules.builtin``) are left out.
WANTED_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
#: Every apt or dpkg call is bounded.
APT_TIMEOUT_S = 600


class BuildError(Exception):
    """The guest could not be built; the message says what and where."""


@dataclass(frozen=True)
class Guest:
    """What the runner boots."""

    kernel: Path
    initramfs: Path
    kernel_version: str
    #: "vmlinux (PVH)" or "bzImage".
    kernel_format: str


def cache_dir(override: str | None = None) -> Path:
    return Path(override or os.environ.get("OOMWARDEN_VM_CACHE") or PROJECT / ".cache" / "vm")


def inputs_hash() -> str:
    h = hashlib.sha256()
    for path in INPUTS:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def log(message: str) -> None:
    print(f"vm: {message}", file=sys.stderr, flush=True)


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=APT_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise BuildError(f"{argv[0]} is not installed (the VM lane needs a Debian host)") \
            from None
    except subprocess.TimeoutExpired:
        raise BuildError(f"{' '.join(argv)} took more than {APT_TIMEOUT_S} s") from None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


_updated = False


def apt_update() -> None:
    """``apt-get update``, once per process."""
    global _updated  # noqa: PLW0603 (one update per build is the point)
    if _updated:
        return
    log("apt-get update")
    done = _run(["apt-get", "update", "-qq"])
    if done.returncode != 0:
        raise BuildError(f"apt-get update failed: {_last_line(done.stderr)}")
    _updated = True


def ensure_qemu() -> str:
    """The path of qemu-system-x86_64, installed with apt when missing."""
    found = shutil.which(QEMU)
    if found:
        return found
    log(f"{QEMU} is missing: apt-get install {QEMU_PACKAGE}")
    apt_update()
    done = _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", QEMU_PACKAGE])
    if done.returncode != 0:
        raise BuildError(f"apt-get install {QEMU_PACKAGE} failed: {_last_line(done.stderr)}")
    found = shutil.which(QEMU)
    if not found:
        raise BuildError(f"{QEMU_PACKAGE} installed, but {QEMU} is still not on PATH")
    return found


def _kernel_package() -> str:
    """The versioned image package the metapackage depends on right now."""
    for attempt in range(2):
        done = _run(["apt-cache", "depends", KERNEL_META])
        for line in done.stdout.splitlines():
            name = line.strip().removeprefix("Depends:").strip()
            if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
                return name
        if attempt == 0:
            apt_update()
    raise BuildError(f"apt-cache depends {KERNEL_META} names no linux-image package "
                     f"({_last_line(done.stderr or done.stdout)})")


def download(package: str, into: Path) -> Path:
    """``apt-get download PACKAGE`` into ``into`` (kept: the same version is
    not fetched twice); an update is tried once when the download fails."""
    into.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        done = _run(["apt-cache", "show", "--no-all-versions", package])
        version = next((line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
                        if line.startswith("Version:")), None)
        if version is not None:
            # Debian file names spell an epoch's colon as %3a.
            name = f"{package}_{version.replace(':', '%3a')}_amd64.deb"
            if (into / name).is_file():
                return into / name
            got = _run(["apt-get", "download", "-qq", package], cwd=into)
            if got.returncode == 0 and (into / name).is_file():
                return into / name
            why = _last_line(got.stderr) if got.returncode else f"no {name} after download"
        else:
            why = f"no version of {package} known to apt"
        if attempt == 0:
            apt_update()
    raise BuildError(f"apt-get download {package} failed: {why}")


def unpack(deb: Path, into: Path) -> None:
    done = _run(["dpkg", "-x", str(deb), str(into)])
    if done.returncode != 0:
        raise BuildError(f"dpkg -x {deb.name} failed: {_last_line(done.stderr)}")


# -- the kernel -------------------------------------------------------------------------

XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4
PT_INTERP = 3


def _program_headers(elf: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, offset, size in the file) of each program header of an ELF64."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise BuildError("not an ELF64 file")
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize)
        yield p_type, p_offset, p_filesz


def has_pvh_note(elf: bytes) -> bool:
    """Whether the ELF kernel has the Xen PVH entry note qemu's ``-kernel`` boots."""
    for p_type, offset, size in _program_headers(elf):
        if p_type != PT_NOTE:
            continue
        pos, end = offset, offset + size
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def _decompress(payload: bytes) -> bytes | None:
    """The bzImage payload decompressed, for the formats Python reads (xz,
    gzip) or the zstd tool handles; None for any other."""
    if payload.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor().decompress(payload)
    if payload.startswith(b"\x1f\x8b"):
        import zlib  # noqa: PLC0415

        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    if payload.startswith(b"\x28\xb5\x2f\xfd") and shutil.which("zstd"):
        done = subprocess.run(["zstd", "-dc"], input=payload, capture_output=True,
                              timeout=120, check=False)
        return done.stdout if done.returncode == 0 else None
    return None


def vmlinux_from_bzimage(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage (boot protocol >= 2.08 gives the
    payload's place), or None when it cannot be had."""
    if bzimage[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", bzimage, 0x206)[0] < 0x208:
        return None
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    elf = _decompress(bzimage[start:start + payload_length])
    return elf if elf is not None and elf.startswith(b"\x7fELF") else None


# -- modules ----------------------------------------------------------------------------

def _section(elf: bytes, wanted: bytes) -> bytes | None:
    """The content of an ELF64 section by name."""
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize)
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    names = elf[str_off:str_off + str_size]
    for i in range(shnum):
        name_at, offset, size = header(i)
        if names[name_at:names.index(b"\0", name_at)] == wanted:
            return elf[offset:offset + size]
    return None


def module_bytes(path: Path) -> bytes:
    """A module file's ELF content (``.ko``, ``.ko.xz`` or ``.ko.zst``)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        plain = _decompress(data)
        if plain is None:
            raise BuildError(f"{path.name}: zstd is needed to read it")
        return plain
    return data


def module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def module_depends(elf: bytes) -> list[str]:
    """The ``depends=`` entry of a module's ``.modinfo``."""
    info = _section(elf, b".modinfo") or b""
    for entry in info.split(b"\0"):
        if entry.startswith(b"depends="):
            value = entry[len(b"depends="):].decode()
            return [d.replace("-", "_") for d in value.split(",") if d]
    return []


def resolve_modules(moddir: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """(name, ELF) of the wanted modules and their dependencies, each after
    what it needs; built-in ones are left out."""
    files = {module_name(p): p for p in moddir.rglob("*.ko*") if ".ko" in p.name}
    builtin_file = moddir / "modules.builtin"
    builtin = {module_name(Path(line.strip())) for line in
               builtin_file.read_text().splitlines()} if builtin_file.is_file() else set()
    ordered: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done or name in builtin:
            return
        if name in chain:
            raise BuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in files:
            raise BuildError(f"module {name} (for {' -> '.join(chain) or 'the guest'}) is "
                             f"neither in {moddir} nor built in")
        elf = module_bytes(files[name])
        for dep in module_depends(elf):
            visit(dep, (*chain, name))
        done.add(name)
        ordered.append((name, elf))

    for name in wanted:
        visit(name, ())
    return ordered


# -- the initramfs ------------------------------------------------------------------------

class Cpio:
    """A newc cpio archive written in memory (no cpio tool, and device nodes
    without mknod's privileges)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"",
               rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        self.parts.append(header + encoded + b"\0" * (-(110 + len(encoded)) % 4))
        self.parts.append(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def is_static(elf: bytes) -> bool:
    return not any(p_type == PT_INTERP for p_type, _, _ in _program_headers(elf))


def initramfs(busybox: bytes, modules: list[tuple[str, bytes]], init: bytes) -> bytes:
    archive = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "lib",
              "lib/modules", "lower", "rw", "newroot"):
        archive.directory(d)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3)
    archive.file("bin/busybox", busybox, 0o755)
    for name, elf in modules:
        archive.file(f"lib/modules/{name}.ko", elf)
    archive.file("modules.load", "".join(f"{name}\n" for name, _ in modules).encode())
    archive.file("init", init, 0o755)
    return archive.finish()


# -- the build ----------------------------------------------------------------------------

def _read_stamp(cache: Path) -> dict[str, str] | None:
    try:
        data = json.loads((cache / "stamp.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _guest(cache: Path, stamp: dict[str, str]) -> Guest:
    return Guest(cache / stamp["kernel"], cache / "initramfs.cpio", stamp["kernel_version"],
                 stamp["kernel_format"])


def cached(cache: Path) -> Guest | None:
    """The built guest when its stamp matches the builder's inputs."""
    stamp = _read_stamp(cache)
    if stamp is None or stamp.get("inputs") != inputs_hash():
        return None
    guest = _guest(cache, stamp)
    return guest if guest.kernel.is_file() and guest.initramfs.is_file() else None


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two lanes at once build once
        yield


def build(cache: Path, *, force: bool = False) -> Guest:
    """The guest, built unless the cache already holds it for these inputs."""
    with _locked(cache):
        if not force and (guest := cached(cache)) is not None:
            return guest
        started = time.monotonic()
        log(f"building the guest in {cache}")
        downloads = cache / "downloads"
        kernel_deb = download(_kernel_package(), downloads)
        busybox_deb = download(BUSYBOX, downloads)
        fetched = time.monotonic()
        with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as tmp:
            work = Path(tmp)
            unpack(kernel_deb, work / "kernel")
            unpack(busybox_deb, work / "busybox")
            vmlinuz = sorted((work / "kernel" / "boot").glob("vmlinuz-*"))
            moddirs = sorted((work / "kernel" / "lib" / "modules").glob("*"))
            if len(vmlinuz) != 1 or len(moddirs) != 1:
                raise BuildError(f"{kernel_deb.name}: expected one vmlinuz and one module "
                                 f"folder, found {len(vmlinuz)} and {len(moddirs)}")
            version = moddirs[0].name
            busybox = (work / "busybox" / "bin" / "busybox").read_bytes()
            if not is_static(busybox):
                raise BuildError(f"{busybox_deb.name}: bin/busybox is not static")
            bzimage = vmlinuz[0].read_bytes()
            elf = vmlinux_from_bzimage(bzimage)
            if elf is not None and has_pvh_note(elf):
                kernel_name, kernel_data, kernel_format = "vmlinux", elf, "vmlinux (PVH)"
            else:
                kernel_name, kernel_data, kernel_format = "bzImage", bzimage, "bzImage"
            modules = resolve_modules(moddirs[0], WANTED_MODULES)
            (cache / kernel_name).write_bytes(kernel_data)
            (cache / "initramfs.cpio").write_bytes(
                initramfs(busybox, modules, INIT_SCRIPT.read_bytes()))
        stamp = {
            "inputs": inputs_hash(),
            "kernel": kernel_name,
            "kernel_format": kernel_format,
            "kernel_version": version,
            "kernel_package": kernel_deb.name,
            "busybox_package": busybox_deb.name,
            "modules": " ".join(name for name, _ in modules),
        }
        (cache / "stamp.json").write_text(json.dumps(stamp, indent=1) + "\n")
        now = time.monotonic()
        log(f"built {kernel_format} {version} + initramfs ({len(modules)} modules) in "
            f"{now - started:.1f} s ({now - fetched:.1f} s after the downloads)")
        return _guest(cache, stamp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the VM lane's guest kernel and initramfs.")
    parser.add_argument("--cache", help="artefact folder (default: .cache/vm in the project)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    try:
        guest = build(cache_dir(args.cache), force=args.force)
    except BuildError as e:
        print(f"vm: error: {e}", file=sys.stderr)
        return 1
    print(f"{guest.kernel} ({guest.kernel_format}, {guest.kernel_version}), {guest.initramfs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
