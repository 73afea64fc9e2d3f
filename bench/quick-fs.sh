#!/bin/bash
# Quick virtio-fs comparison, Ferry vs virtiofsd, in the same tiny guest (cache=auto).
# Not `make bench` yet (issue 6): one backend per call, figures on stdout.
#   bash bench/quick-fs.sh ferry|virtiofsd
# Needs: cargo build --release -p ferry, make guest-image, and for virtiofsd
# `apt-get install libseccomp-dev libcap-ng-dev && cargo install virtiofsd --locked`.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=$(mktemp -d)
trap 'rm -rf $W' EXIT
D=$W/share; mkdir -p $D; S=$W/fs.sock
cat > $W/guest.sh <<'G'
cd /mnt/share0 || exit 1
up() { cut -d' ' -f1 /proc/uptime; }
a=$(up); dd if=/dev/zero of=w bs=1M count=256 conv=fsync 2>/dev/null; b=$(up)
echo 3 > /proc/sys/vm/drop_caches
c=$(up); dd if=w of=/dev/null bs=1M 2>/dev/null; d=$(up); rm w
e=$(up); for i in $(seq 1000); do echo x > f$i; done; stat f* > /dev/null; rm f*; f=$(up)
echo "BENCH write256M=$(echo "$b $a" | awk '{print $1-$2}')s coldread256M=$(echo "$d $c" | awk '{print $1-$2}')s files1000=$(echo "$f $e" | awk '{print $1-$2}')s"
G
if [ "$1" = ferry ]; then
  /usr/bin/time -o $W/rusage -f "%U %S %M" "$ROOT/target/release/ferry" serve --share tag=share0,dir=$D,socket=$S 2>$W/backend.log &
else
  /usr/bin/time -o $W/rusage -f "%U %S %M" "$HOME/.cargo/bin/virtiofsd" --socket-path=$S --shared-dir=$D --cache=auto --sandbox=none 2>$W/backend.log &
fi
for _ in $(seq 50); do [ -S $S ] && break; sleep 0.1; done
qemu-system-x86_64 -machine q35,accel=tcg -cpu max -smp 2 -m 512M -nographic -nodefaults -serial stdio -no-reboot \
  -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
  -kernel "$ROOT/guest-image/out/vmlinuz" -initrd "$ROOT/guest-image/out/initramfs.cpio.gz" \
  -append "console=ttyS0 quiet panic=-1 ferry.noshell ferry.net=off ferry.fs=share0" \
  -fw_cfg "name=opt/ferry/run,file=$W/guest.sh" \
  -chardev socket,id=f0,path=$S -device vhost-user-fs-pci,chardev=f0,tag=share0 2>&1 | grep BENCH
# virtiofsd exits with QEMU; ferry serves on until told.
pkill -TERM -f "^$ROOT/target/release/ferry serve --share tag=share0,dir=$D" 2>/dev/null
sleep 1
echo "$1 cpu-user cpu-sys maxrss-kb: $(tail -1 $W/rusage)"
