#!/usr/bin/env python3
"""Build the tern Debian package from [package.metadata.deb] in Cargo.toml.

    scripts/build_deb.py [--no-build] [--out DIR]

What `cargo deb` does with the same table, for the keys that table uses
(assets, conf-files, maintainer-scripts, depends with $auto, section,
priority, maintainer, extended-description), with dpkg-deb and
dpkg-shlibdeps (package dpkg-dev) instead of compiling cargo-deb: CI builds
the package this way in seconds, where compiling cargo-deb would cost about
5 minutes of a 17-minute budget. Operators may use either.

--no-build   use target/release/tern as it is (default: cargo build --release)
--out DIR    where the .deb goes (default: target/debian)

Prints the path of the .deb. Exits 1 on a missing asset or a failing tool.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def die(msg):
    print(f"build_deb: {msg}", file=sys.stderr)
    sys.exit(1)


def run(cmd, **kw):
    try:
        return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout
    except FileNotFoundError:
        die(f"{cmd[0]} not found (dpkg-shlibdeps is in the package dpkg-dev)")
    except subprocess.CalledProcessError as e:
        die(f"{' '.join(map(str, cmd))} failed:\n{e.stdout}{e.stderr}")


def shlib_depends(elfs):
    """The Depends of `elfs` as dpkg-shlibdeps computes them ($auto)."""
    if not elfs:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        # dpkg-shlibdeps insists on a debian/control of a source package.
        (Path(tmp) / "debian").mkdir()
        (Path(tmp) / "debian/control").write_text("Source: tern\n\nPackage: tern\nArchitecture: any\n")
        out = run(["dpkg-shlibdeps", "-O", *map(str, elfs)], cwd=tmp)
    for line in out.splitlines():
        if line.startswith("shlibs:Depends="):
            return [d.strip() for d in line.split("=", 1)[1].split(",") if d.strip()]
    return []


def is_elf(path):
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out", default=str(REPO / "target/debian"))
    args = ap.parse_args()

    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())
    pkg = cargo["package"]
    deb = pkg["metadata"]["deb"]
    name = deb.get("name", pkg["name"])
    # Debian sorts "~" before anything: a semver pre-release 1.0.0-rc.1
    # becomes 1.0.0~rc.1, as cargo-deb writes it.
    version = pkg["version"].replace("-", "~")
    arch = run(["dpkg", "--print-architecture"]).strip()

    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", pkg["name"], "--bin", "tern"], cwd=REPO, check=True)

    out = Path(args.out)
    stage = out / f"{name}_{version}_{arch}"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "DEBIAN").mkdir(parents=True)

    elfs, md5s, size = [], [], 0
    for src, dest, mode in deb["assets"]:
        source = REPO / src
        if not source.is_file():
            die(f"asset {src} does not exist (build first, or fix Cargo.toml)")
        target = stage / (dest + source.name if dest.endswith("/") else dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        os.chmod(target, int(mode, 8))
        if is_elf(source):
            elfs.append(source)
            # What cargo-deb does by default for release binaries.
            run(["strip", "--strip-unneeded", str(target)])
        data = target.read_bytes()
        size += len(data)
        rel = target.relative_to(stage)
        md5s.append(f"{hashlib.md5(data).hexdigest()}  {rel}\n")

    depends = []
    for d in (d.strip() for d in deb.get("depends", "$auto").split(",")):
        depends.extend(shlib_depends(elfs) if d == "$auto" else [d])

    description = pkg["description"]
    extended = " ".join(deb.get("extended-description", "").split())
    control = [
        f"Package: {name}",
        f"Version: {version}",
        f"Architecture: {arch}",
        f"Maintainer: {deb['maintainer']}",
        f"Installed-Size: {(size + 1023) // 1024}",
        f"Depends: {', '.join(depends)}",
        f"Section: {deb.get('section', 'net')}",
        f"Priority: {deb.get('priority', 'optional')}",
        f"Description: {description}",
    ]
    if extended:
        control.append(f" {extended}")
    (stage / "DEBIAN/control").write_text("\n".join(control) + "\n")
    (stage / "DEBIAN/md5sums").write_text("".join(md5s))
    conf = deb.get("conf-files", [])
    for c in conf:
        if not (stage / c.lstrip("/")).is_file():
            die(f"conf-file {c} is not among the assets")
    if conf:
        (stage / "DEBIAN/conffiles").write_text("".join(f"{c}\n" for c in conf))
    scripts = REPO / deb.get("maintainer-scripts", "debian/")
    for script in ["preinst", "postinst", "prerm", "postrm"]:
        if (scripts / script).is_file():
            shutil.copyfile(scripts / script, stage / "DEBIAN" / script)
            os.chmod(stage / "DEBIAN" / script, 0o755)

    deb_path = out / f"{name}_{version}_{arch}.deb"
    run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(stage), str(deb_path)])
    print(deb_path)


if __name__ == "__main__":
    main()
