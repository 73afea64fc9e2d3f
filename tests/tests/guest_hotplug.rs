//! Guest memory plugged in while the VM runs (a `pc-dimm` backed by a shared memfd, as
//! libvirt's `virsh attach-device` of a `<memory model='dimm'>` and Kata Containers do): QEMU
//! sends every vhost-user backend a new memory table before the guest can use the memory, and
//! buffers the guest places there must work for both devices. The guest boots with 512 MiB
//! and gets 512 MiB more, which its allocator prefers (see the script); ferry's `/stats` shows
//! each device mapping it. (A new table that did not reach the devices hangs the share's
//! reads of the new memory: checked by having the relay swallow it.)
//!
//! Ferry runs in a test namespace with no route out; the downloads come from a test host on a
//! veth link.

use std::time::Duration;

use ferry_tests::{GuestSpec, TestHost, TestNet};

const DEADLINE: Duration = Duration::from_secs(240);
const SIZE: usize = 8 << 20;

/// The guest memory each device maps, as `/stats` says: the NIC's, then each share's.
fn mapped_mib(api: &std::path::Path) -> Vec<u64> {
    let s = ferry_tests::api_get(api, "/stats");
    let mut v = vec![s["net"]["guest_memory_mib"].as_u64().unwrap_or(0)];
    for share in s["fs"].as_array().cloned().unwrap_or_default() {
        v.push(share["guest_memory_mib"].as_u64().unwrap_or(0));
    }
    v
}

#[test]
fn memory_plugged_in_at_run_time_carries_both_devices_buffers() {
    let net = TestNet::new().expect("make the test network (needs root and iproute2)");
    let remote = net.remote_addr.clone();
    let _host = TestHost::start(
        &net.remote,
        &[&remote, "--tcp-blob", "7000", &SIZE.to_string()],
    );
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        r#"
check() {{ if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }}
before=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)
echo FERRY-PLUG-NOW
while [ ! -e /mnt/tools/plugged ]; do sleep 0.1; done
for m in /sys/devices/system/memory/memory*; do
  [ "$(cat $m/state)" = offline ] && echo online > $m/state
done
after=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)
check grown "$(( (after - before) / 1024 ))" 512
# q35 puts the boot memory below 4 GiB (zone DMA32) and the plugged memory above (zone
# Normal), which the allocator takes first: the page cache that reads the file back lives
# there. Normal's free pages before and after, for a failure's message.
grep -A1 'zone *Normal' /proc/zoneinfo | tail -1
head -c 48m /dev/urandom > /tmp/big
cp /tmp/big /mnt/tools/big && sync && echo 3 > /proc/sys/vm/drop_caches
check share "$(cmp /tmp/big /mnt/tools/big && echo same)" same
grep -A1 'zone *Normal' /proc/zoneinfo | tail -1
check net "$(for k in 1 2 3; do nc {remote} 7000 | wc -c; done | tr '\n' ' ')" "{SIZE} {SIZE} {SIZE} "
"#
    );
    let ferry_tests::ServedGuest {
        mut ferry,
        mut qemu,
        tools,
        api,
    } = ferry_tests::serve_and_boot_spec(
        &net.inner,
        dir.path(),
        GuestSpec {
            script,
            memory_mib: 512,
            max_memory_mib: 2048,
            ..Default::default()
        },
        &["--dns-upstream".into(), "127.0.0.1:1".into()],
        &[],
    );
    qemu.wait_console("FERRY-PLUG-NOW", DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    assert_eq!(mapped_mib(&api), [512, 512], "before the plug");
    for cmd in [
        "object_add memory-backend-memfd,id=hp0,size=512M,share=on",
        "device_add pc-dimm,id=dimm0,memdev=hp0",
    ] {
        let out = qemu.hmp(cmd).unwrap_or_else(|e| panic!("{cmd}: {e}"));
        assert!(out.trim().is_empty(), "{cmd}: {out}");
    }
    assert_eq!(mapped_mib(&api), [1024, 1024], "after the plug");
    std::fs::write(tools.dir.join("plugged"), b"").unwrap();
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(3, &format!("ferry log:\n{}", ferry.log_tail()));
    assert_eq!(
        std::fs::metadata(tools.dir.join("big")).unwrap().len(),
        48 << 20
    );
    assert!(ferry.is_running());
}
