#!/bin/sh
# CNI plugin of the test node: one veth per pod, its host end on the bridge `tbr0` of the suite's
# private network namespace (127.97.0.1/16), its pod end `eth0` with the next free 127.97.X.Y/16
# and a default route via 127.97.0.1. Only loopback-range addresses exist: the suite's namespace
# holds nothing but `lo` and this bridge, so no packet can reach any other network.
# Addresses are files under $state (the node's private /var/lib/cni), taken under a lock and
# given back on DEL.
set -u
state=/var/lib/cni/tessera-bridge
bridge=tbr0
gateway=127.97.0.1

fail() {
  printf '{"cniVersion":"0.4.0","code":%s,"msg":"%s"}\n' "$1" "$2"
  exit 1
}

host_if() {
  printf 'tv%s' "$(printf '%s' "$CNI_CONTAINERID" | cut -c1-12)"
}

case "$CNI_COMMAND" in
ADD)
  cat >/dev/null
  mkdir -p "$state"
  exec 9>"$state/lock"
  flock 9
  ip=""
  if [ -f "$state/by-id/$CNI_CONTAINERID" ]; then
    ip="$(cat "$state/by-id/$CNI_CONTAINERID")"
  else
    mkdir -p "$state/by-id" "$state/ips"
    last="$(cat "$state/last" 2>/dev/null || echo 1)"
    n="$last"
    while :; do
      n=$((n % 65000 + 1))
      [ "$n" -lt 2 ] && n=2
      cand="127.97.$((n / 256)).$((n % 256))"
      if [ $((n % 256)) -ne 0 ] && [ $((n % 256)) -ne 255 ] && [ ! -e "$state/ips/$cand" ]; then
        ip="$cand"
        break
      fi
      [ "$n" -eq "$last" ] && fail 11 "no free address in 127.97.0.0/16"
    done
    echo "$n" >"$state/last"
    echo "$CNI_CONTAINERID" >"$state/ips/$ip"
    echo "$ip" >"$state/by-id/$CNI_CONTAINERID"
  fi
  flock -u 9
  hif="$(host_if)"
  ip link del "$hif" >/dev/null 2>&1
  ip link add "$hif" type veth peer name "$CNI_IFNAME" netns "$CNI_NETNS" >/dev/null 2>&1 ||
    fail 11 "creating the veth pair $hif/$CNI_IFNAME failed"
  ip link set "$hif" master "$bridge" up >/dev/null 2>&1 || fail 11 "attaching $hif to $bridge failed"
  # In the pod: lo keeps 127.0.0.1 but only 127.0.0.0/16 is local, so 127.96/16 (services) and
  # 127.97/16 (pods) leave through eth0; route_localnet lets loopback-range packets do so.
  # `scope global`: ip(8) would give a 127.x address host scope, unusable as a source on eth0.
  nsenter --net="$CNI_NETNS" sh -e -c "
    ip link set lo up
    ip addr add 127.0.0.1/16 dev lo 2>/dev/null || true
    ip addr del 127.0.0.1/8 dev lo 2>/dev/null || true
    echo 1 >/proc/sys/net/ipv4/conf/all/route_localnet
    echo 1 >/proc/sys/net/ipv4/conf/$CNI_IFNAME/route_localnet
    ip addr add $ip/16 dev $CNI_IFNAME scope global
    ip link set $CNI_IFNAME up
    ip route add default via $gateway dev $CNI_IFNAME
  " >/dev/null 2>&1 || fail 11 "configuring $CNI_IFNAME in $CNI_NETNS failed"
  printf '{"cniVersion":"0.4.0","interfaces":[{"name":"%s"},{"name":"%s","sandbox":"%s"}],"ips":[{"version":"4","address":"%s/16","gateway":"%s","interface":1}],"routes":[{"dst":"0.0.0.0/0","gw":"%s"}],"dns":{}}\n' \
    "$hif" "$CNI_IFNAME" "$CNI_NETNS" "$ip" "$gateway" "$gateway"
  ;;
DEL)
  cat >/dev/null
  mkdir -p "$state"
  exec 9>"$state/lock"
  flock 9
  if [ -f "$state/by-id/$CNI_CONTAINERID" ]; then
    ip="$(cat "$state/by-id/$CNI_CONTAINERID")"
    rm -f "$state/ips/$ip" "$state/by-id/$CNI_CONTAINERID"
  fi
  flock -u 9
  ip link del "$(host_if)" >/dev/null 2>&1
  exit 0
  ;;
CHECK)
  cat >/dev/null
  ;;
VERSION)
  printf '{"cniVersion":"0.4.0","supportedVersions":["0.3.0","0.3.1","0.4.0"]}\n'
  ;;
*)
  fail 4 "unknown CNI_COMMAND $CNI_COMMAND"
  ;;
esac
