#!/usr/bin/env bash
# Unpacks a lavapipe that offers cooperative matrices (Mesa 26 from Debian unstable: 8x8x8
# matrices of f16 products summed in f32), with the C library and everything else it
# links, into DIR (default .lavapipe-coop), for the test of `mm_coop`
# (node/src/testing.rs, `in_coop_child`): the system's lavapipe offers none. Nothing is
# installed; the test starts its child through DIR/lib's own loader. Debian/Ubuntu on
# x86-64 with apt-get only. Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.lavapipe-coop}
suite=${STRATA_COOP_SUITE:-sid}

if [ -f "$dir/lvp.json" ]; then exit 0; fi
if [ "$(uname -sm)" != "Linux x86_64" ] || ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "lavapipe-coop: needs Linux on x86-64 with apt-get and dpkg-deb" >&2
    exit 1
fi
echo "==> fetching Mesa's lavapipe from Debian $suite into $dir (for the cooperative-matrix test)" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/apt/state/lists/partial" "$tmp/apt/cache/archives/partial" "$tmp/debs" "$tmp/root"
cat >"$tmp/apt/debian.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
apt_opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$tmp/apt" -o "Dir::State=$tmp/apt/state"
    -o "Dir::Cache=$tmp/apt/cache" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" update -qq
# The driver, the Vulkan loader and the C library, with everything they depend on (real
# packages only: apt-cache lists virtual ones in angle brackets).
apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
    --no-replaces --no-enhances mesa-vulkan-drivers libvulkan1 libc6 libgcc-s1 |
    grep -E '^[a-z0-9]' | sort -u >"$tmp/packages"
(cd "$tmp/debs" && xargs -a "$tmp/packages" apt-get "${apt_opts[@]}" download -qq)
for deb in "$tmp"/debs/*.deb; do dpkg-deb -x "$deb" "$tmp/root"; done
rm -rf "$dir.part"
mkdir -p "$dir.part/lib"
cp -a "$tmp/root/usr/lib/x86_64-linux-gnu/." "$dir.part/lib/"
test -x "$dir.part/lib/ld-linux-x86-64.so.2" && test -f "$dir.part/lib/libvulkan_lvp.so" || {
    echo "lavapipe-coop: the unpacked packages lack the loader or lavapipe" >&2
    exit 1
}
final_lib=$(pwd)/$dir/lib
[ "${dir#/}" != "$dir" ] && final_lib=$dir/lib
printf '{"file_format_version": "1.0.1", "ICD": {"library_path": "%s/libvulkan_lvp.so", "api_version": "1.4.0"}}\n' \
    "$final_lib" >"$dir.part/lvp.json"
rm -rf "$dir"
mv "$dir.part" "$dir"
echo "==> lavapipe of Mesa $(dpkg-deb -f "$tmp"/debs/mesa-vulkan-drivers_*.deb Version) in $dir ($(du -sh "$dir" | cut -f1))" >&2
