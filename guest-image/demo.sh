# What `make run` shows: the guest's NIC and share, both served by one ferry process on the
# host. The guest powers off when this script ends.
echo
echo "== Ferry demo: eth0 and /mnt/share0 are vhost-user devices served by one ferry process =="
echo "-- eth0 (virtio-net): MAC and MTU"
ip -o link show eth0
echo "-- /mnt/share0 (virtio-fs): mount, file system and root attributes, answered by ferry"
grep virtiofs /proc/mounts
stat -f /mnt/share0
stat /mnt/share0
echo "-- not yet: DHCP/NAT (virtio-net data path) and file access below the root (virtio-fs"
echo "   file server) come with their own issues; see README, Status."
