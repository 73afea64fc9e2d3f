//! The guest's report: `FERRY-CHECK <name> ok|fail <detail>` lines and `FERRY-DONE rc=N`.

/// One check the guest reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// The check's name.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What the guest said about it.
    pub detail: String,
}

/// What a finished guest reported.
#[derive(Clone, Debug)]
pub struct GuestOutcome {
    /// The exit code of the guest's script.
    pub rc: i32,
    /// The checks, in order.
    pub checks: Vec<Check>,
    /// The whole console.
    pub console: String,
}

impl GuestOutcome {
    /// Panics unless the guest reported exactly `expected` checks and all passed; the message
    /// lists the failures, the console's tail and `context` (ferry's log, say).
    pub fn assert_all_ok(&self, expected: usize, context: &str) {
        let failed: Vec<_> = self.checks.iter().filter(|c| !c.ok).collect();
        assert!(
            failed.is_empty() && self.checks.len() == expected,
            "{} of {expected} checks reported, failed: {failed:?}\nconsole:\n{}\n{context}",
            self.checks.len(),
            crate::tail(&self.console, 40),
        );
    }

    /// The check called `name`, if reported.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// Parses the checks out of a console log. Lines may carry a carriage return or kernel noise
/// before the marker.
pub fn parse_checks(console: &str) -> Vec<Check> {
    console
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("FERRY-CHECK ")? + "FERRY-CHECK ".len()..];
            let mut parts = rest.trim_end_matches('\r').splitn(3, ' ');
            let name = parts.next()?.to_string();
            let ok = match parts.next()? {
                "ok" => true,
                "fail" => false,
                _ => return None,
            };
            let detail = parts.next().unwrap_or("").to_string();
            Some(Check { name, ok, detail })
        })
        .collect()
}

/// The script's exit code from `FERRY-DONE rc=N`, once the guest printed it.
pub fn parse_done(console: &str) -> Option<i32> {
    console.lines().find_map(|l| {
        let rest = &l[l.find("FERRY-DONE rc=")? + "FERRY-DONE rc=".len()..];
        rest.trim_end_matches('\r').trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_checks_and_done() {
        let console = "noise\r\nFERRY-CHECK eth0-mac ok 02:46:52:59:00:02\r\n\
                       [  1.0] kernel FERRY-CHECK mount fail no such device\n\
                       FERRY-CHECK bogus maybe\nFERRY-CHECK bare ok\nFERRY-DONE rc=3\r\n";
        let c = parse_checks(console);
        assert_eq!(c.len(), 3);
        assert_eq!(
            c[0],
            Check {
                name: "eth0-mac".into(),
                ok: true,
                detail: "02:46:52:59:00:02".into()
            }
        );
        assert!(!c[1].ok);
        assert_eq!(c[1].detail, "no such device");
        assert_eq!(c[2].detail, "");
        assert_eq!(parse_done(console), Some(3));
        assert_eq!(parse_done("FERRY-DONE rc="), None);
    }
}
