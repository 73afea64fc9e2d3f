//! What the stack tells the audit log (`--audit-log`, `GET /events`): a flow opened (with
//! ferry's host socket: its fd and both addresses, so a socket an EDR tool shows under
//! ferry's PID can be traced to the guest's flow), a flow closed (what crossed it, and why
//! it ended), a flow a rule refused.
//!
//! Theory of operation. The protocols call these at the three places flows begin and end
//! (`FlowTable::insert` and the `*_remove`/`*_close` of each protocol) and where a rule
//! refuses; with no audit log they return at once. The event is built from the same
//! [`FlowInfo`] that `GET /flows` lists, so both name a flow alike.

use super::flow::{Flow, FlowId};
use super::*;
use ferry_audit::json;

/// The guest's port of the packet in `frame` (its echo identifier for pings): the first
/// two bytes of a TCP or UDP header, bytes 4-5 of an echo request.
pub(super) fn guest_port(ip: &IpInfo, frame: &[u8]) -> u16 {
    let header = match ip.src {
        IpAddr::V4(_) => usize::from(frame.get(14).map_or(5, |b| b & 0x0f)) * 4,
        IpAddr::V6(_) => 40,
    };
    let at = 14
        + header
        + if matches!(
            ip.proto,
            smoltcp::wire::IpProtocol::Icmp | smoltcp::wire::IpProtocol::Icmpv6
        ) {
            4
        } else {
            0
        };
    frame
        .get(at..at + 2)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
}

/// A flow as the audit log and `GET /flows` name it.
pub(super) fn flow_fields(f: &FlowInfo) -> ferry_audit::Value {
    json!({
        "proto": f.protocol,
        "origin": f.origin.name(),
        "guest": f.guest.to_string(),
        "remote": f.remote.to_string(),
        "fd": f.fd,
        "host_local": f.host_local,
        "host_peer": f.host_peer,
    })
}

impl NetStack {
    /// Sends the audit events of this stack to `audit`.
    pub fn with_audit(mut self, audit: ferry_audit::Audit) -> Self {
        self.audit = Some(audit);
        self
    }

    /// Flow `id` opened.
    pub(super) fn audit_open(&self, id: FlowId) {
        let Some(a) = self.audit.as_ref().filter(|a| a.wanted()) else {
            return;
        };
        if let Some(f) = self.flows.get(id) {
            let info = self.flow_info(f, true, true);
            let mut v = flow_fields(&info);
            v["state"] = json!(info.state);
            a.emit("flow_open", v);
        }
    }

    /// Flow `f` (taken out of the table, its host socket still open) closed for `reason`.
    pub(super) fn audit_close(&self, f: &Flow<Kind>, reason: &str) {
        let Some(a) = self.audit.as_ref().filter(|a| a.wanted()) else {
            return;
        };
        let info = self.flow_info(f, false, true);
        let mut v = flow_fields(&info);
        v["reason"] = json!(reason);
        v["duration_secs"] = json!(info.age.as_secs_f64());
        v["to_guest_bytes"] = json!(info.to_guest.bytes);
        v["from_guest_bytes"] = json!(info.from_guest.bytes);
        v["to_guest_packets"] = json!(info.to_guest.packets);
        v["from_guest_packets"] = json!(info.from_guest.packets);
        a.emit("flow_close", v);
    }

    /// A rule refused a new flow: `dir` "out" (the guest's, to `remote`) or "in" (a published
    /// port's client `guest`... its client address, to host port `remote`'s port).
    pub(super) fn audit_refused(
        &self,
        proto: Proto,
        dir: &str,
        from: SocketAddr,
        to: SocketAddr,
        action: Action,
        rule_position: Option<usize>,
    ) {
        let Some(a) = &self.audit else {
            return;
        };
        let rule = rule_position.and_then(|n| {
            self.rules
                .as_ref()
                .and_then(|r| r.list().get(n - 1).map(|i| i.id))
        });
        a.emit(
            "flow_refused",
            json!({
                "proto": proto.to_string(),
                "dir": dir,
                "from": from.to_string(),
                "to": to.to_string(),
                "action": action.to_string(),
                "rule": rule.map_or(json!("default"), |id| json!(id)),
            }),
        );
    }
}

impl Drop for NetStack {
    /// The guest left and its stack goes: its flows close with it.
    fn drop(&mut self) {
        if self.audit.is_none() {
            return;
        }
        for (_, f) in self.flows.iter() {
            self.audit_close(f, "guest_detached");
        }
    }
}
