#!/bin/bash
# Quick iperf3 comparison, Ferry vs QEMU user net (libslirp), in the same tiny guest.
# Not `make bench` yet (issue 6): one backend per call, figures on stdout.
#   bash bench/quick-net.sh ferry|slirp
# Runs as root. The iperf3 server and the backend live in a network namespace made here, with
# only a loopback: nothing leaves this machine. Needs: cargo build --release -p ferry,
# make guest-image, iperf3 on the host.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
KIND=$1
NS=ferry-bench-$$
W=$(mktemp -d)
trap 'ip netns del $NS 2>/dev/null; rm -rf $W' EXIT
cat > $W/guest.sh <<'G'
H=$(tr ' ' '\n' < /proc/cmdline | grep '^ferry.iphost=' | cut -d= -f2)
iperf3 -c $H -t 8 -f m 2>&1 | grep -E 'receiver' | sed 's/^/guest-to-host /'
iperf3 -c $H -t 8 -f m -R 2>&1 | grep -E 'receiver' | sed 's/^/host-to-guest /'
G
ip netns add $NS && ip -n $NS link set lo up
ip netns exec $NS iperf3 -s -B 127.0.0.1 -D -I $W/iperf.pid
sleep 0.5
COMMON=(-machine q35,accel=tcg -cpu max -smp 2 -m 512M -nographic -nodefaults -serial stdio -no-reboot
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
  -kernel "$ROOT/guest-image/out/vmlinuz" -initrd "$ROOT/guest-image/out/initramfs.cpio.gz"
  -fw_cfg "name=opt/ferry/run,file=$W/guest.sh")
if [ "$KIND" = ferry ]; then
  ip netns exec $NS /usr/bin/time -o $W/rusage -f "%U %S %M" "$ROOT/target/release/ferry" serve \
    --net-socket $W/n.sock --dns-upstream 127.0.0.1:1 2>$W/ferry.log &
  for _ in $(seq 50); do [ -S $W/n.sock ] && break; sleep 0.1; done
  qemu-system-x86_64 "${COMMON[@]}" -append "console=ttyS0 quiet panic=-1 ferry.noshell ferry.iphost=192.168.127.254" \
    -chardev socket,id=n0,path=$W/n.sock -netdev vhost-user,id=net0,chardev=n0 \
    -device virtio-net-pci,netdev=net0,vectors=0,romfile=,mac=02:46:52:59:00:02 2>&1 | grep -E '^(guest|host)-to'
  kill "$(pgrep -f "^$ROOT/target/release/ferry serve --net-socket $W/n.sock")"; sleep 1
  echo "ferry cpu-user cpu-sys maxrss-kb: $(cat $W/rusage)"
else
  ip netns exec $NS /usr/bin/time -o $W/rusage -f "%U %S %M" qemu-system-x86_64 "${COMMON[@]}" \
    -append "console=ttyS0 quiet panic=-1 ferry.noshell ferry.iphost=10.0.2.2" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= 2>&1 | grep -E '^(guest|host)-to'
  echo "qemu (guest and slirp) cpu-user cpu-sys maxrss-kb: $(cat $W/rusage)"
fi
kill "$(cat $W/iperf.pid)" 2>/dev/null
