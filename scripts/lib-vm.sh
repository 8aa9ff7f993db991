# Shared by scripts/demo and scripts/measure-boot (sourced, not run): what a VM
# needs, and a `tetherd serve` of our own that boots them.
#
#   vm_prepare [--install]  installs missing Debian packages (with --install, as
#                           root), builds the binaries and the initramfs; sets
#                           VM_KERNEL and VM_INITRD, or VM_UNAVAILABLE (why not)
#   vm_serve                starts `tetherd serve` (a free port for guests, the
#                           API on a unix socket) with a fresh state directory;
#                           sets VM_API (unix:PATH); stopped at exit

VM_UNAVAILABLE=""
VM_KERNEL=""
VM_INITRD=""
VM_API=""
VM_STATE=""
VM_SERVE_PID=""

vm_missing_packages() {
  local need=()
  command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
  ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
  if ! command -v busybox >/dev/null || ldd "$(command -v busybox)" >/dev/null 2>&1; then
    need+=(busybox-static)
  fi
  command -v cpio >/dev/null || need+=(cpio)
  command -v xz >/dev/null || need+=(xz-utils)
  echo "${need[@]}"
}

vm_prepare() {
  local install="${1:-}" need
  need="$(vm_missing_packages)"
  if [ -n "$need" ]; then
    if [ "$install" = --install ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "installing $need (apt-get)" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >&2 && apt-get install -y -qq $need >&2 || true
      need="$(vm_missing_packages)"
    fi
  fi
  cargo build --release --quiet -p runtime-guest -p runtime-appliance
  cargo build --profile guest --quiet -p runtime-guest
  if [ -n "$need" ]; then
    VM_UNAVAILABLE="missing Debian packages: $need (apt-get install $need, as root)"
    return 0
  fi
  local files
  if ! files="$(scripts/build-initramfs --no-install --tether target/guest/tether)"; then
    VM_UNAVAILABLE="scripts/build-initramfs failed"
    return 0
  fi
  VM_KERNEL="$(awk '$1 == "kernel" { print $2 }' <<<"$files")"
  VM_INITRD="$(awk '$1 == "initramfs" { print $2 }' <<<"$files")"
}

vm_stop_serve() {
  local pidfile pid
  set +e  # cleanup must not stop at the first failure (nor change the exit code)
  if [ -n "$VM_SERVE_PID" ]; then
    kill "$VM_SERVE_PID" 2>/dev/null
    wait "$VM_SERVE_PID" 2>/dev/null
  fi
  # QEMU runs in its own process group and outlives tetherd: end ours.
  for pidfile in "$VM_STATE"/state/vms/*/qemu.pid; do
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    grep -q qemu "/proc/$pid/cmdline" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  done
  [ -n "$VM_STATE" ] && rm -rf "$VM_STATE"
  return 0
}

vm_serve() {
  VM_STATE="$(mktemp -d "${TMPDIR:-/tmp}/tether-vms.XXXXXX")"
  trap vm_stop_serve EXIT
  # The API on a unix socket in the private state directory: only this user
  # reaches it, no token needed.
  target/release/tetherd serve --state-dir "$VM_STATE/state" \
    --listen 127.0.0.1:0 --api "unix:$VM_STATE/api.sock" \
    --kernel "$VM_KERNEL" --initrd "$VM_INITRD" \
    2>"$VM_STATE/tetherd.log" &
  VM_SERVE_PID=$!
  local i
  for i in $(seq 100); do
    if [ -S "$VM_STATE/api.sock" ]; then
      VM_API="unix:$VM_STATE/api.sock"
      return 0
    fi
    kill -0 "$VM_SERVE_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "tetherd serve did not start:" >&2
  cat "$VM_STATE/tetherd.log" >&2
  return 1
}
