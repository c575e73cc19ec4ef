#!/usr/bin/env bash
# Builds sluice_VERSION_ARCH.deb from a sluice binary:
#   packaging/build-deb.sh BINARY OUTDIR VERSION
# (`cargo xtask deb` passes the release binary; the e2e suite its own.)
set -euo pipefail
bin="$1"; out="$2"; version="$3"
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
arch="$(dpkg --print-architecture)"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
install -D -m 0755 "$bin" "$stage/usr/bin/sluice"
install -D -m 0644 "$here/sluice.service" "$stage/lib/systemd/system/sluice.service"
# The example configuration, with state under /var/lib/sluice.
install -d -m 0755 "$stage/etc/sluice/policy.d"
sed 's|^state_dir: .*|state_dir: /var/lib/sluice|' "$root/policies/sluice.yaml" > "$stage/etc/sluice/sluice.yaml"
chmod 0644 "$stage/etc/sluice/sluice.yaml"
install -D -m 0644 "$root/README.md" "$stage/usr/share/doc/sluice/README.md"
install -D -m 0644 "$root/docs/POLICY.md" "$stage/usr/share/doc/sluice/POLICY.md"
install -D -m 0644 "$root/docs/ARCHITECTURE.md" "$stage/usr/share/doc/sluice/ARCHITECTURE.md"
install -d "$stage/DEBIAN"
for s in postinst prerm postrm; do install -m 0755 "$here/debian/$s" "$stage/DEBIAN/$s"; done
echo "/etc/sluice/sluice.yaml" > "$stage/DEBIAN/conffiles"
size="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
cat > "$stage/DEBIAN/control" <<CONTROL
Package: sluice
Version: $version
Architecture: $arch
Maintainer: Sluice developers <sluice@localhost>
Installed-Size: $size
Depends: libc6, libgcc-s1, libstdc++6, libhyperscan5, ca-certificates
Recommends: systemd
Section: net
Priority: optional
Description: data-path security node for CI runner hosts
 eBPF programs redirect CI jobs' connections to AI endpoints and databases
 into a local proxy that attributes them to the job, enforces signed
 policy bundles (masking, blocking, approvals, credential injection) and
 records every session as tamper-evident evidence.
CONTROL
mkdir -p "$out"
dpkg-deb --root-owner-group --build "$stage" "$out/sluice_${version}_${arch}.deb" >/dev/null
echo "$out/sluice_${version}_${arch}.deb"
