# What `make run` shows: the guest's NIC and share, both served by one ferry process on the
# host. The guest powers off when this script ends.
echo
echo "== Ferry demo: eth0 and /mnt/share0 are vhost-user devices served by one ferry process =="
echo "-- eth0 (virtio-net): MAC, and the lease from ferry's DHCP server"
ip -o link show eth0
ip -4 -o addr show eth0
ip route
cat /etc/resolv.conf
echo "-- ping the gateway (ferry's own stack answers)"
ping -c 2 -W 2 192.168.127.1
echo "-- /mnt/share0 (virtio-fs): this checkout, served by ferry"
grep virtiofs /proc/mounts
ls /mnt/share0
head -n 3 /mnt/share0/README.md
echo "-- a file written in the guest, read back through ferry"
echo "written by the guest at $(date)" > /tmp/demo.txt
cp /tmp/demo.txt /mnt/share0/target/ferry-demo.txt && cat /mnt/share0/target/ferry-demo.txt
sha256sum /tmp/demo.txt /mnt/share0/target/ferry-demo.txt
rm /mnt/share0/target/ferry-demo.txt
echo "-- DNS: names ferry's gateway answers itself"
nslookup host.ferry.internal 2>&1 | grep -A1 '^Name'
nslookup http.docker.internal 2>&1 | grep -A1 '^Name'
echo "-- IPv6: the address the guest built from ferry's router advertisement (SLAAC)"
ip -6 -o addr show dev eth0 scope global | awk '{print $4}'
echo "-- TCP through the NAT: the host alias is the host's 127.0.0.1, where make run serves this checkout on port 8089"
wget -q -O - http://host.ferry.internal:8089/README.md | head -n 1
echo "-- the same file through the HTTP proxy on the gateway's port 3128 (it connects from the host, so 127.0.0.1 is the host's)"
http_proxy=http://http.docker.internal:3128 wget -q -O - http://127.0.0.1:8089/README.md | head -n 1
