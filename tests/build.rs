//! Builds the static guest-side probe (`probe/probe.c`) the guest tests copy into a share.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = "probe/probe.c";
    println!("cargo:rerun-if-changed={src}");
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(out.join("probe"))
        .arg(src)
        .status()
        .expect("run the C compiler for probe/probe.c (apt-get install gcc libc6-dev)");
    assert!(status.success(), "building probe/probe.c failed");
}
