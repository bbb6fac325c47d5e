#!/usr/bin/env python3
"""Assembles a FROM-scratch container image archive without a container engine or a registry.

One layer holds the given ELF files, the shared libraries `ldd` reports for them (with the
dynamic loader at the path their PT_INTERP names), a minimal /etc (passwd, group, nsswitch.conf)
and any extra files. The archive is an OCI image layout in a tar that also carries docker's
`manifest.json`, so each of these reads it:

    ctr -n k8s.io images import FILE.tar          (containerd; also `kind load image-archive`)
    skopeo inspect oci-archive:FILE.tar:REF       (REF: one of the --ref values)
    skopeo copy oci-archive:FILE.tar:REF docker://registry.example.com/NAME:TAG
    docker load -i FILE.tar

Python standard library only. The output is reproducible: every timestamp is --epoch
(default $SOURCE_DATE_EPOCH, else 0), owners are 0:0, entries are sorted, gzip has no mtime.

    oci-image.py --output out.tar --ref ghcr.io/o/name:v1 \\
        --elf target/debug/name=/usr/local/bin/name --strip \\
        --user 65532:65532 --entrypoint /usr/local/bin/name --label k=v ...
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

NONROOT_UID = 65532

PASSWD = "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
GROUP = "root:x:0:\nnonroot:x:65532:\n"
NSSWITCH = "passwd: files\ngroup: files\nhosts: files dns\n"

ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}


def die(msg):
    print(f"oci-image: {msg}", file=sys.stderr)
    sys.exit(1)


def split_pair(value, what):
    if "=" not in value:
        die(f"{what} must be SRC=DEST or KEY=VALUE, got {value!r}")
    a, b = value.split("=", 1)
    return a, b


def is_elf(path):
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def ldd(path):
    """Shared libraries of an ELF file as {path in the image: path on this machine}."""
    try:
        out = subprocess.run(["ldd", path], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        die("ldd is not installed")
    text = out.stdout + out.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return {}
    if out.returncode != 0:
        die(f"ldd {path} failed: {text.strip()}")
    libs = {}
    for line in out.stdout.splitlines():
        line = line.strip()
        if "not found" in line:
            die(f"{path}: a shared library is missing on this machine: {line}")
        m = re.match(r"^\S+ => (/\S+) \(0x[0-9a-f]+\)$", line)
        if m:
            libs[m.group(1)] = m.group(1)
            continue
        m = re.match(r"^(/\S+) \(0x[0-9a-f]+\)$", line)  # the loader, at its PT_INTERP path
        if m:
            libs[m.group(1)] = m.group(1)
    return libs


def find_system_lib(soname):
    """Path of a shared library of this machine, from the loader cache (`ldconfig -p`)."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    arch = {"x86_64": "x86-64", "aarch64": "AArch64"}.get(platform.machine(), "")
    for line in out.splitlines():
        m = re.match(r"^\s*(\S+) \(([^)]*)\) => (/\S+)$", line)
        if m and m.group(1) == soname and (not arch or arch in m.group(2)):
            return m.group(3)
    die(f"shared library {soname} is not in this machine's loader cache (ldconfig -p)")


def strip_copy(src, tmpdir):
    """A copy of src without debug sections (strip --strip-debug, else objcopy)."""
    dest = os.path.join(tmpdir, f"{len(os.listdir(tmpdir))}-{os.path.basename(src)}")
    for cmd in (["strip", "--strip-debug", "-o", dest, src], ["objcopy", "--strip-debug", src, dest]):
        if shutil.which(cmd[0]) and subprocess.run(cmd, capture_output=True).returncode == 0:
            return dest
    die(f"cannot strip {src}: neither strip nor objcopy worked")


class Layer:
    def __init__(self, epoch):
        self.epoch = epoch
        self.files = {}  # image path -> (source path or bytes, mode)
        self.dirs = {}  # image path -> mode

    def add_dir(self, path, mode=0o755):
        path = path.rstrip("/") or "/"
        while path not in ("/", ""):
            self.dirs.setdefault(path, mode)
            path = os.path.dirname(path)
            mode = 0o755

    def add(self, dest, src, mode=None):
        if not dest.startswith("/"):
            die(f"image paths are absolute: {dest!r}")
        if mode is None:
            mode = 0o755 if isinstance(src, str) and os.access(src, os.X_OK) else 0o644
        self.files[dest] = (src, mode)
        self.add_dir(os.path.dirname(dest))

    def tar(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            for path in sorted(self.dirs):
                info = tarfile.TarInfo(path.lstrip("/"))
                info.type = tarfile.DIRTYPE
                info.mode = self.dirs[path]
                info.mtime = self.epoch
                t.addfile(info)
            for path in sorted(self.files):
                src, mode = self.files[path]
                data = src if isinstance(src, bytes) else open(src, "rb").read()
                info = tarfile.TarInfo(path.lstrip("/"))
                info.size = len(data)
                info.mode = mode
                info.mtime = self.epoch
                t.addfile(info, io.BytesIO(data))
        return buf.getvalue()


def normalise_ref(ref):
    """The name containerd stores: docker.io/library/NAME:TAG for short names."""
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "latest")
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = "docker.io/library/" + name
    elif "." not in first and ":" not in first and first != "localhost":
        name = "docker.io/" + name
    return f"{name}:{tag}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="archive to write")
    p.add_argument("--ref", action="append", required=True, help="image reference (repeatable)")
    p.add_argument("--elf", action="append", default=[], metavar="SRC=DEST",
                   help="an ELF file; its shared libraries come along (repeatable)")
    p.add_argument("--system-lib", action="append", default=[], metavar="SONAME",
                   help="a shared library of this machine by soname, for what is loaded at run time (repeatable)")
    p.add_argument("--file", action="append", default=[], metavar="SRC=DEST", help="a plain file (repeatable)")
    p.add_argument("--dir", action="append", default=[], metavar="PATH[=MODE]",
                   help="an empty directory, MODE octal (repeatable)")
    p.add_argument("--strip", action="store_true", help="strip debug info from the --elf files")
    p.add_argument("--user", default="0:0", help="UID:GID the entrypoint runs as")
    p.add_argument("--entrypoint", action="append", required=True, help="entrypoint argv (repeatable)")
    p.add_argument("--cmd", action="append", default=[], help="default arguments (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--port", action="append", default=[], help="exposed port, e.g. 8889/tcp")
    p.add_argument("--epoch", type=int, default=int(os.environ.get("SOURCE_DATE_EPOCH", "0")))
    p.add_argument("--gzip-level", type=int, default=6)
    args = p.parse_args()

    created = datetime.datetime.fromtimestamp(args.epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    layer = Layer(args.epoch)
    layer.add("/etc/passwd", PASSWD.encode(), 0o644)
    layer.add("/etc/group", GROUP.encode(), 0o644)
    layer.add("/etc/nsswitch.conf", NSSWITCH.encode(), 0o644)
    layer.add_dir("/tmp", 0o1777)
    layer.add_dir("/home/nonroot", 0o755)

    libs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.elf:
            src, dest = split_pair(spec, "--elf")
            if not os.path.isfile(src):
                die(f"{src} does not exist (build it first)")
            if not is_elf(src):
                die(f"{src} is not an ELF file")
            libs.update(ldd(src))
            layer.add(dest, strip_copy(src, tmp) if args.strip else src, 0o755)
        for soname in args.system_lib:
            path = find_system_lib(soname)
            libs[path] = path
            libs.update(ldd(path))
        for dest, src in sorted(libs.items()):
            if dest not in layer.files:
                layer.add(dest, os.path.realpath(src), 0o755)
        for spec in args.file:
            src, dest = split_pair(spec, "--file")
            if not os.path.isfile(src):
                die(f"{src} does not exist")
            layer.add(dest, src)
        for spec in args.dir:
            path, _, mode = spec.partition("=")
            layer.add_dir(path, int(mode, 8) if mode else 0o755)

        raw = layer.tar()
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    gz = gzip.compress(raw, compresslevel=args.gzip_level, mtime=0)

    labels = dict(split_pair(l, "--label") for l in args.label)
    env = [e for e in args.env]
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, "PATH=/usr/local/bin:/usr/bin:/bin")
    arch = ARCH.get(platform.machine(), platform.machine())
    config = {
        "created": created,
        "architecture": arch,
        "os": "linux",
        "config": {
            "User": args.user,
            "Env": env,
            "Entrypoint": args.entrypoint,
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "scripts/oci-image.py"}],
    }
    if args.cmd:
        config["config"]["Cmd"] = args.cmd
    if args.port:
        config["config"]["ExposedPorts"] = {port: {} for port in args.port}

    blobs = {}

    def blob(data):
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": f"sha256:{digest}", "size": len(data)}

    def js(obj):
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    config_desc = blob(js(config))
    layer_desc = blob(gz)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer_desc}],
        "annotations": {**labels, "org.opencontainers.image.created": created},
    }
    manifest_desc = blob(js(manifest))
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **manifest_desc,
                "platform": {"architecture": arch, "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": normalise_ref(ref),
                    "org.opencontainers.image.ref.name": ref,
                },
            }
            for ref in args.ref
        ],
    }
    docker_manifest = [
        {
            "Config": f"blobs/sha256/{config_desc['digest'][7:]}",
            "RepoTags": [normalise_ref(r).removeprefix("docker.io/library/") for r in args.ref],
            "Layers": [f"blobs/sha256/{layer_desc['digest'][7:]}"],
        }
    ]

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    part = args.output + ".part"
    with tarfile.open(part, mode="w", format=tarfile.PAX_FORMAT) as t:
        def put(name, data, mode=0o644):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            info.mtime = args.epoch
            t.addfile(info, io.BytesIO(data))

        for d in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = args.epoch
            t.addfile(info)
        for digest in sorted(blobs):
            put(f"blobs/sha256/{digest}", blobs[digest])
        put("oci-layout", js({"imageLayoutVersion": "1.0.0"}))
        put("index.json", js(index))
        put("manifest.json", js(docker_manifest))
    os.replace(part, args.output)
    print(
        f"oci-image: {args.output}: {', '.join(args.ref)}; layer {len(raw) / 2**20:.1f} MiB "
        f"({len(gz) / 2**20:.1f} MiB gzip), {len(layer.files)} files, {len(libs)} shared libraries; "
        f"manifest {manifest_desc['digest']}"
    )


if __name__ == "__main__":
    main()
