#!/bin/sh
# CNI plugin of the loopback-only test node: brings up `lo` in the pod's network namespace and
# reports 127.0.0.1/8 on the requested interface. containerd 1.6 refuses a sandbox whose CNI
# result has no IP on eth0, and the node must never reach any address but loopback.
case "$CNI_COMMAND" in
ADD)
  cat >/dev/null
  if ! nsenter --net="$CNI_NETNS" ip link set lo up >/dev/null 2>&1; then
    printf '{"cniVersion":"0.4.0","code":11,"msg":"bringing up lo in %s failed"}\n' "$CNI_NETNS"
    exit 1
  fi
  printf '{"cniVersion":"0.4.0","interfaces":[{"name":"%s","sandbox":"%s"}],"ips":[{"version":"4","address":"127.0.0.1/8","interface":0}],"dns":{}}\n' \
    "$CNI_IFNAME" "$CNI_NETNS"
  ;;
DEL | CHECK)
  cat >/dev/null
  ;;
VERSION)
  printf '{"cniVersion":"0.4.0","supportedVersions":["0.3.0","0.3.1","0.4.0"]}\n'
  ;;
*)
  printf '{"cniVersion":"0.4.0","code":4,"msg":"unknown CNI_COMMAND %s"}\n' "$CNI_COMMAND"
  exit 1
  ;;
esac
