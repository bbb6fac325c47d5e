# Prepares the node's private mount namespace (run inside it by `nsenter -m`; $1 = the node's
# work directory). Nothing here is visible on the host: the namespace was made with
# `--propagation slave` and every mount uses -n (no /run/mount/utab on the host).
set -eu
d="$1"
# tmpfs over a host directory that keeps its entries (bound back from a view of the original),
# so that kubelet's and containerd's directories can be made in it without touching the host.
shadow() {
  p="$1"
  o="$d/shadow$(echo "$p" | tr / _)"
  mkdir -p "$o"
  mount -n --bind "$p" "$o"
  mount -n -t tmpfs -o mode=755 tmpfs "$p"
  for e in $(ls -A "$o"); do
    [ -e "$p/$e" ] || [ -L "$p/$e" ] && continue
    if [ -L "$o/$e" ]; then cp -P "$o/$e" "$p/$e"
    elif [ -d "$o/$e" ]; then mkdir "$p/$e" && mount -n --rbind "$o/$e" "$p/$e"
    else touch "$p/$e" && mount -n --bind "$o/$e" "$p/$e"; fi
  done
}
for p in /var/lib /var/log /run; do
  mkdir -p "$p"
  shadow "$p"
done
for p in /var/lib/kubelet /var/log/pods /var/log/containers /var/lib/cni /run/netns /run/containerd; do
  mkdir -p "$p"
  mount -n -t tmpfs tmpfs "$p"
done
# kubelet sets these six sysctls; here it writes stand-in files.
for f in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes; do
  s="$d/sysctl/$(echo "$f" | tr / _)"
  cat "/proc/sys/$f" >"$s"
  mount -n --bind "$s" "/proc/sys/$f"
done
