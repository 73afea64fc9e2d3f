//! Id ranges the guest and the host name differently (`uidmap=`, `gidmap=`).

/// A range of ids that the guest and the host name differently, as virtiofsd's
/// `--translate-uid map:GUEST:HOST:COUNT`: guest id `guest + i` is host id `host + i` for `i`
/// below `count`, both ways. Ids outside the range pass unchanged, so a host id in the guest's
/// range (host `0` with `0:1000:1`) shows under two names in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMap {
    /// The first id as the guest sees it.
    pub guest: u32,
    /// The first id as the host sees it.
    pub host: u32,
    /// How many ids; neither range reaches `u32::MAX` (which means "no change" in SETATTR).
    pub count: u32,
}

impl IdMap {
    /// The map `GUEST:HOST[:COUNT]` (COUNT 1 when left out), or why it is not one.
    pub fn parse(s: &str) -> Result<Self, String> {
        let n: Vec<&str> = s.split(':').collect();
        let num = |v: &str| {
            v.parse::<u32>()
                .ok()
                .filter(|v| *v != u32::MAX)
                .ok_or_else(|| format!("{v:?} is not an id (0 to 4294967294)"))
        };
        let (guest, host, count) = match n.as_slice() {
            [g, h] => (num(g)?, num(h)?, 1),
            [g, h, c] => (num(g)?, num(h)?, num(c)?),
            _ => return Err("expected GUEST:HOST or GUEST:HOST:COUNT".into()),
        };
        if count == 0 {
            return Err("COUNT must be at least 1".into());
        }
        let end = |first: u32| u64::from(first) + u64::from(count) <= u64::from(u32::MAX);
        if !end(guest) || !end(host) {
            return Err("the range runs past the largest id, 4294967294".into());
        }
        Ok(IdMap { guest, host, count })
    }

    /// Host id for guest id `id`, when the range holds it.
    fn to_host(self, id: u32) -> Option<u32> {
        (id.wrapping_sub(self.guest) < self.count).then(|| self.host + (id - self.guest))
    }

    /// Guest id for host id `id`, when the range holds it.
    fn to_guest(self, id: u32) -> Option<u32> {
        (id.wrapping_sub(self.host) < self.count).then(|| self.guest + (id - self.host))
    }

    /// The ids `a` and `b` both hold, as (first, last), when they share any.
    fn common((a, b): (u32, u32), (c, d): (u32, u32)) -> Option<(u32, u32)> {
        if b == 0 || d == 0 {
            return None;
        }
        let first = a.max(c);
        let last = (u64::from(a) + u64::from(b) - 1).min(u64::from(c) + u64::from(d) - 1);
        (u64::from(first) <= last).then_some((first, last as u32))
    }
}

impl std::fmt::Display for IdMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.guest, self.host, self.count)
    }
}

/// The id ranges a share names differently (`uidmap=` given once or more): none, or ranges
/// that overlap neither on the guest's side nor on the host's, so that each id has one name
/// each way, as virtiofsd's repeated `--translate-uid map:`. Ids in no range pass unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMaps(Vec<IdMap>);

impl IdMaps {
    /// The ranges `maps`, or why they cannot go together.
    pub fn new(maps: Vec<IdMap>) -> Result<Self, String> {
        for (i, a) in maps.iter().enumerate() {
            for b in &maps[..i] {
                for (side, x, y) in [("guest", a.guest, b.guest), ("host", a.host, b.host)] {
                    if let Some((first, last)) = IdMap::common((x, a.count), (y, b.count)) {
                        return Err(format!(
                            "{b} and {a} both map {side} ids {first} to {last}; give ranges that do not overlap"
                        ));
                    }
                }
            }
        }
        Ok(IdMaps(maps))
    }

    /// Host id for guest id `id`.
    pub fn to_host(&self, id: u32) -> u32 {
        self.0.iter().find_map(|m| m.to_host(id)).unwrap_or(id)
    }

    /// Guest id for host id `id`.
    pub fn to_guest(&self, id: u32) -> u32 {
        self.0.iter().find_map(|m| m.to_guest(id)).unwrap_or(id)
    }

    /// The ranges, in the order given.
    pub fn ranges(&self) -> &[IdMap] {
        &self.0
    }
}
