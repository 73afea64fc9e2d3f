//! File events for the audit log (`audit=files` on a share): what the guest changed, with the
//! path inside the share and the guest's ids, so a host file alert under ferry's PID can be
//! traced to what the guest did.
//!
//! Theory of operation. The server calls [`FileAudit::event`] after an operation that
//! changes the share succeeded: a file, folder, node or link made (`create`), opened for
//! writing (`open_write`), removed (`unlink`, `rmdir`), renamed (`rename`), or its mode or
//! owner set (`setattr`). The path comes from the file system ([`FileSystem::node_path`]: the
//! passthrough server asks the kernel where its descriptor of the node is) and, for the
//! operations that name an entry, the entry's name. Nothing is gathered unless the audit
//! log has a sink or a follower; the event itself never waits (see `ferry_audit`).

use std::ffi::CStr;

use ferry_audit::{json, Audit, Value};

use crate::filesystem::{Context, FileSystem};

/// One share's file events.
pub struct FileAudit {
    audit: Audit,
    share: String,
}

impl FileAudit {
    /// Events of the share tagged `share` go to `audit`.
    pub fn new(audit: Audit, share: &str) -> Self {
        FileAudit {
            audit,
            share: share.to_string(),
        }
    }

    /// The path of `node` (and entry `name` in it, when given) inside the share.
    fn path<F: FileSystem>(fs: &F, node: u64, name: Option<&CStr>) -> String {
        let base = fs
            .node_path(node)
            .unwrap_or_else(|| format!("<node {node}>"));
        match name {
            Some(n) => {
                let n = n.to_string_lossy();
                if base.ends_with('/') {
                    format!("{base}{n}")
                } else {
                    format!("{base}/{n}")
                }
            }
            None => base,
        }
    }

    /// `op` on entry `name` of `node` (or on `node` itself) by the caller of `ctx`, with
    /// `extra` fields (an object).
    pub(crate) fn event<F: FileSystem>(
        &self,
        fs: &F,
        ctx: &Context,
        op: &str,
        node: u64,
        name: Option<&CStr>,
        extra: Value,
    ) {
        if !self.audit.wanted() {
            return;
        }
        self.emit(ctx, op, Self::path(fs, node, name), extra);
    }

    /// The path of entry `name` of `node`, read before an operation that removes it (`None`
    /// when no event would go anywhere).
    pub(crate) fn entry_path<F: FileSystem>(
        &self,
        fs: &F,
        node: u64,
        name: &CStr,
    ) -> Option<String> {
        self.audit
            .wanted()
            .then(|| Self::path(fs, node, Some(name)))
    }

    fn emit(&self, ctx: &Context, op: &str, path: String, extra: Value) {
        let mut v = json!({
            "share": self.share,
            "op": op,
            "path": path,
            "uid": ctx.uid,
            "gid": ctx.gid,
            "pid": ctx.pid,
        });
        if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
            m.extend(e);
        }
        self.audit.emit("file", v);
    }

    /// `op` (unlink, rmdir) removed the entry at `path` (from [`entry_path`](Self::entry_path)).
    pub(crate) fn removed(&self, ctx: &Context, op: &str, path: Option<String>) {
        if let Some(p) = path {
            self.emit(ctx, op, p, json!({}));
        }
    }

    /// The entry at `from` (from [`entry_path`](Self::entry_path)) is now `new` in `newdir`.
    pub(crate) fn renamed<F: FileSystem>(
        &self,
        fs: &F,
        ctx: &Context,
        from: Option<String>,
        newdir: u64,
        new: &CStr,
    ) {
        if let Some(from) = from {
            let to = Self::path(fs, newdir, Some(new));
            self.emit(ctx, "rename", from, json!({ "to": to }));
        }
    }
}

/// Whether open flags `flags` let the caller change the file.
pub(crate) fn writes(flags: u32) -> bool {
    let f = flags as i32;
    (f & libc::O_ACCMODE) != libc::O_RDONLY || f & (libc::O_TRUNC | libc::O_APPEND) != 0
}

/// The mode and ids a SETATTR set, as event fields.
pub(crate) fn setattr_fields(args: &crate::filesystem::SetattrArgs) -> Value {
    let mut v = json!({});
    if let Some(m) = args.mode {
        v["mode"] = json!(format!("{:04o}", m & 0o7777));
    }
    if let Some(u) = args.uid {
        v["new_uid"] = json!(u);
    }
    if let Some(g) = args.gid {
        v["new_gid"] = json!(g);
    }
    v
}
