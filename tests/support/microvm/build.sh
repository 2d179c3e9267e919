#!/usr/bin/env bash
# Builds (once per machine, cached) what the microVM end-to-end tests boot:
# an uncompressed Debian kernel (`vmlinux`, entered through PVH) and a busybox
# initramfs with that kernel's virtio-net modules and the guest /init.
#
#   tests/support/microvm/build.sh [CACHE_DIR]      (default: target/microvm)
#
# Prints two lines on success, the only output on stdout:
#   vmlinux=/abs/path/vmlinux
#   initramfs=/abs/path/initramfs-HASH.cpio
# Exits 3 with a reason on stderr when the machine cannot provide the parts
# (no busybox-static, no kernel package to download); other failures exit 1.
#
# The kernel is keyed by package name and version, the initramfs by a hash
# of the guest files, this script and the busybox binary. Set
# SLIPWAY_MICROVM_KERNEL_PKG to pin a kernel package (e.g.
# linux-image-6.1.0-56-amd64).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
cache="${1:-$repo/target/microvm}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"

say() { echo "microvm/build: $*" >&2; }
unavailable() { say "$*"; exit 3; }

# Tests run in parallel (threads and test binaries): one builder at a time.
exec 9>"$cache/.lock"
flock -w 600 9 || { say "timed out waiting for $cache/.lock"; exit 1; }

# --- busybox ----------------------------------------------------------------
busybox=""
for b in /bin/busybox /usr/bin/busybox; do
  if [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then busybox="$b"; break; fi
done
[ -n "$busybox" ] || unavailable "needs a statically linked busybox (apt-get install busybox-static)"
command -v dpkg-deb >/dev/null || unavailable "needs dpkg-deb"

# --- which kernel -----------------------------------------------------------
# The newest 6.1 image, as Debian bookworm's linux-image-amd64 names it; a
# release whose meta-package points elsewhere falls back to the newest
# linux-image-6.1*-amd64 the archive lists.
pick_kernel() {
  local dep
  dep="$(apt-cache depends linux-image-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-6\.1[^ ]*-amd64\)$/\1/p' | head -n1)"
  if [ -n "$dep" ]; then echo "$dep"; return; fi
  apt-cache search --names-only '^linux-image-6\.1[.0-9]*-[0-9]+-amd64$' 2>/dev/null |
    cut -d' ' -f1 | sort -V | tail -n1
}
version_of() {
  apt-cache show --no-all-versions "$1" 2>/dev/null | sed -n 's/^Version: //p' | head -n1
}

# apt-cache takes seconds: remember its answer until the apt lists change.
lists_stamp="$(stat -c %Y /var/lib/apt/lists 2>/dev/null || echo none) ${SLIPWAY_MICROVM_KERNEL_PKG:-}"
pkg="" ver=""
if [ -s "$cache/kernel.choice" ] && [ "$(head -n1 "$cache/kernel.choice")" = "$lists_stamp" ]; then
  read -r pkg ver < <(sed -n 2p "$cache/kernel.choice")
else
  pkg="${SLIPWAY_MICROVM_KERNEL_PKG:-}"
  [ -n "$pkg" ] || pkg="$(pick_kernel || true)"
  if [ -z "$pkg" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "no kernel package in the apt lists; running apt-get update"
    apt-get update -qq >&2 || true
    lists_stamp="$(stat -c %Y /var/lib/apt/lists 2>/dev/null || echo none) ${SLIPWAY_MICROVM_KERNEL_PKG:-}"
    pkg="$(pick_kernel || true)"
  fi
  [ -z "$pkg" ] || ver="$(version_of "$pkg" || true)"
  if [ -n "$pkg" ] && [ -n "$ver" ]; then
    printf '%s\n%s %s\n' "$lists_stamp" "$pkg" "$ver" >"$cache/kernel.choice"
  fi
fi

if [ -z "$pkg" ] || [ -z "$ver" ]; then
  # No apt lists (offline?): use the newest kernel built before, if any.
  last="$(ls -d "$cache"/linux-image-*/vmlinux 2>/dev/null | sort -V | tail -n1 || true)"
  [ -n "$last" ] || unavailable "cannot find ${SLIPWAY_MICROVM_KERNEL_PKG:-a linux-image-6.1*-amd64 package} with apt-cache (run apt-get update)"
  kdir="$(dirname "$last")"
  say "apt-cache knows no kernel; using the cached $(basename "$kdir")"
else
  kdir="$cache/${pkg}_${ver//[:~]/_}"
fi

# --- kernel: download, extract, decompress ----------------------------------
# The kernel's own scripts/extract-vmlinux, redone here: find each
# compression magic in the bzImage, try to decompress from there, keep the
# first result that is an ELF file.
is_elf() { [ "$(head -c4 "$1" | od -An -c | tr -d ' ')" = '177ELF' ]; }
try_decompress() { # magic(printf escapes) marker command… ; image out
  local magic="$1" marker="$2" img="$3" out="$4"; shift 4
  local pos
  for pos in $(tr "$magic\n$marker" "\n$marker=" <"$img" | grep -abo "^$marker" | cut -d: -f1); do
    tail -c+"$pos" "$img" | "$@" >"$out" 2>/dev/null || true
    if [ -s "$out" ] && is_elf "$out"; then return 0; fi
  done
  return 1
}
# A decompressor from the host, else busybox's (which lacks the xz BCJ
# filters the kernel uses).
tool() { if command -v "$1" >/dev/null; then echo "$1"; else echo "$busybox $1"; fi; }
# shellcheck disable=SC2046 # $(tool …) is a command and its arguments
extract_vmlinux() { # bzImage out
  local img="$1" out="$2"
  try_decompress '\037\213\010' xy "$img" "$out" $(tool gunzip) && return
  try_decompress '\3757zXZ\000' abcde "$img" "$out" $(tool unxz) && return
  try_decompress 'BZh' xy "$img" "$out" $(tool bunzip2) && return
  try_decompress '\135\0\0\0' xxx "$img" "$out" $(tool unlzma) && return
  try_decompress '\211\114\132' xy "$img" "$out" lzop -d && return
  try_decompress '\002!L\030' xxx "$img" "$out" lz4 -d && return
  try_decompress '(\265/\375' xxx "$img" "$out" unzstd && return
  return 1
}

if [ ! -s "$kdir/vmlinux" ]; then
  command -v apt-get >/dev/null || unavailable "needs apt-get to download $pkg"
  tmp="$(mktemp -d "$cache/.kernel.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  say "downloading $pkg $ver"
  sandbox=()
  [ "$(id -u)" != 0 ] || sandbox=(-o APT::Sandbox::User=root)
  (cd "$tmp" && apt-get download -q "${sandbox[@]}" "$pkg=$ver" >&2) ||
    unavailable "apt-get download $pkg=$ver failed"
  dpkg-deb -x "$tmp"/*.deb "$tmp/root"
  kver="$(ls "$tmp/root/lib/modules" | head -n1)"
  mkdir -p "$tmp/out/modules"
  if ! extract_vmlinux "$tmp/root/boot/vmlinuz-$kver" "$tmp/out/vmlinux"; then
    say "could not decompress vmlinux; booting the bzImage instead (slower)"
    cp "$tmp/root/boot/vmlinuz-$kver" "$tmp/out/vmlinux"
  fi
  # The NIC's modules and everything they depend on (their .modinfo says),
  # in an order where each comes after its dependencies.
  mods="$tmp/root/lib/modules/$kver/kernel"
  declare -A seen=()
  order=()
  want() {
    local name="$1" file deps d
    [ -z "${seen[$name]:-}" ] || return 0
    seen[$name]=1
    file="$(find "$mods" -name "$name.ko" -o -name "${name//_/-}.ko" | head -n1 || true)"
    if [ -z "$file" ]; then
      grep -qE "/${name}\.ko$" "$tmp/root/lib/modules/$kver/modules.builtin" ||
        { say "module $name is neither in $pkg nor built in"; exit 1; }
      return 0
    fi
    deps="$(tr '\0' '\n' <"$file" | sed -n 's/^depends=//p' | head -n1 || true)"
    for d in ${deps//,/ }; do want "$d"; done
    cp "$file" "$tmp/out/modules/$name.ko"
    order+=("$name")
  }
  for m in virtio virtio_ring virtio_mmio virtio_pci failover net_failover virtio_net; do want "$m"; done
  printf '%s\n' "${order[@]}" >"$tmp/out/modules/order"
  echo "$kver" >"$tmp/out/kver"
  rm -rf "$kdir"
  mv "$tmp/out" "$kdir"
  rm -rf "$tmp"
  trap - EXIT
fi

# --- initramfs --------------------------------------------------------------
hash="$(cat "$here/build.sh" "$here/init" "$here/slipway.sh" "$here/udhcpc.script" \
  "$busybox" "$kdir/modules/order" | sha256sum | cut -c1-16)"
initramfs="$kdir/initramfs-$hash.cpio"
if [ ! -s "$initramfs" ]; then
  tmp="$(mktemp -d "$cache/.initramfs.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  root="$tmp/root"
  mkdir -p "$root"/{bin,dev,proc,sys,tmp,run,etc,lib/modules}
  cp "$busybox" "$root/bin/busybox"
  for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
  done
  ln -s bin "$root/sbin"
  cp "$kdir"/modules/*.ko "$kdir/modules/order" "$root/lib/modules/"
  install -m 0755 "$here/init" "$root/init"
  install -m 0644 "$here/slipway.sh" "$root/lib/slipway.sh"
  install -m 0755 "$here/udhcpc.script" "$root/lib/udhcpc.script"
  (cd "$root" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) >"$tmp/initramfs.cpio"
  rm -f "$kdir"/initramfs-*.cpio # older guest files
  mv "$tmp/initramfs.cpio" "$initramfs"
  rm -rf "$tmp"
  trap - EXIT
fi

echo "vmlinux=$kdir/vmlinux"
echo "initramfs=$initramfs"
