//! Guest end-to-end for several virtio-fs request queues: QEMU sets up four
//! (`num-request-queues=4`, which it does not check against what the backend offers), the
//! guest mounts the share and works on it from each of its CPUs, and `/stats` counts the
//! requests each queue carried. A Linux 6.11 or later guest spreads them over a queue per
//! CPU, so at least two queues must carry requests; an earlier one sends all on the first.
//! Either way every check in the guest passes and the data is on the host.

use std::time::Duration;

use ferry_tests::{share_stats, tools_share, FerryProcess, GuestSpec, Qemu};

const DEADLINE: Duration = Duration::from_secs(180);

/// (major, minor) of a `uname -r` such as `6.12.95+deb12-cloud-amd64`.
fn kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (next(), next())
}

#[test]
fn a_guest_uses_the_request_queues_its_frontend_sets_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tools = tools_share(d);
    let data = d.join("data");
    std::fs::create_dir(&data).unwrap();
    let (sock, api) = (d.join("data.sock"), d.join("api.sock"));
    let ferry = FerryProcess::serve(
        d,
        &[
            "--api-socket".into(),
            api.display().to_string(),
            "--share".into(),
            tools.share.clone(),
            "--share".into(),
            format!("tag=data,dir={},socket={}", data.display(), sock.display()),
        ],
        &[tools.socket.clone(), sock.clone(), api.clone()],
    );
    let script = r#"
check() { if [ "$2" = "$3" ]; then echo "FERRY-CHECK $1 ok $2"; else echo "FERRY-CHECK $1 fail want '$3' got '$2'"; fi; }
echo "FERRY-CHECK kernel ok $(uname -r)"
check cpus "$(nproc)" 2
for c in 0 1; do
  taskset -c $c sh -c "mkdir /mnt/data/cpu$c; i=0; while [ \$i -lt 40 ]; do echo $c.\$i > /mnt/data/cpu$c/f\$i; cat /mnt/data/cpu$c/f\$i > /dev/null; i=\$((i+1)); done" &
done
wait
check files "$(ls /mnt/data/cpu0 /mnt/data/cpu1 | grep -c '^f')" 80
check content "$(cat /mnt/data/cpu1/f39)" 1.39
sync
"#
    .to_string();
    let mut qemu = Qemu::boot(
        d,
        &GuestSpec {
            script,
            shares: vec![
                ("tools".into(), tools.socket.clone()),
                ("data".into(), sock.clone()),
            ],
            fs_request_queues: 4,
            cpus: 2,
            ..Default::default()
        },
    );
    let out = qemu
        .wait_done(DEADLINE)
        .unwrap_or_else(|e| panic!("{e}\nferry log:\n{}", ferry.log_tail()));
    out.assert_all_ok(4, &format!("ferry log:\n{}", ferry.log_tail()));
    assert_eq!(
        std::fs::read_to_string(data.join("cpu0/f7")).unwrap(),
        "0.7\n"
    );
    let share = share_stats(&api, "data");
    let queues: Vec<u64> = share["request_queues"]
        .as_array()
        .unwrap_or_else(|| panic!("no request_queues in {share}"))
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    let used = queues.iter().filter(|n| **n > 0).count();
    let release = &out.check("kernel").unwrap().detail;
    if kernel_version(release) >= (6, 11) {
        assert!(used >= 2, "a {release} guest with 2 CPUs used {queues:?}");
    } else {
        assert!(
            used == 1 && queues[0] > 80,
            "a {release} guest sends on the first queue only: {queues:?}"
        );
    }
    drop(qemu);
    drop(ferry);
}

#[test]
fn kernel_versions_parse() {
    assert_eq!(kernel_version("6.12.95+deb12-cloud-amd64"), (6, 12));
    assert_eq!(kernel_version("6.1.0-56-cloud-amd64"), (6, 1));
}
