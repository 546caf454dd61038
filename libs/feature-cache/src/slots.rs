//! Redis Cluster key slots: the slot a key hashes to (CRC16 of its hash
//! tag, or of the whole key, mod 16384, as the cluster computes it), and a
//! hash tag for every slot, so a control key can be placed beside any key
//! (a script may only touch keys of one slot).

use std::sync::OnceLock;

/// How many slots a Redis Cluster has.
pub const SLOTS: u16 = 16384;

/// The slot `key` belongs to.
pub fn slot_of(key: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(hash_tag(key.as_bytes())) % SLOTS
}

/// The part of a key the cluster hashes: the text between the first `{`
/// and the next `}` when it is not empty, else the whole key.
fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|b| *b == b'{') else {
        return key;
    };
    let rest = &key[open + 1..];
    match rest.iter().position(|b| *b == b'}') {
        Some(len) if len > 0 => &rest[..len],
        _ => key,
    }
}

/// A hash tag (`{…}`, braces included) whose keys hash to `slot`.
pub fn tag_of_slot(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        // Short base-36 strings cover every slot within a few hundred
        // thousand tries (a millisecond or two, once per process).
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n: u64 = 0;
        while missing > 0 {
            let text = base36(n);
            let slot = usize::from(slot_of(&text));
            if tags[slot].is_empty() {
                tags[slot] = format!("{{{text}}}");
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[usize::from(slot % SLOTS)]
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_clusters() {
        // Values from Redis's own `CLUSTER KEYSLOT`.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("features:C1"), slot_of("features:C1"));
        assert_eq!(slot_of("{user1000}.following"), slot_of("user1000"));
        assert_eq!(slot_of("foo{}{bar}"), slot_of("foo{}{bar}"));
        assert_ne!(slot_of("foo{}{bar}"), slot_of("bar"));
        assert_eq!(slot_of("foo{{bar}}zap"), slot_of("{bar"));
    }

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        for slot in [0, 1, 5000, 12182, SLOTS - 1] {
            let key = format!(
                "cache-invalidator:db.coll:leader:fence:{}",
                tag_of_slot(slot)
            );
            assert_eq!(slot_of(&key), slot, "{key}");
        }
        let all: std::collections::HashSet<&str> = (0..SLOTS).map(tag_of_slot).collect();
        assert_eq!(all.len(), usize::from(SLOTS));
    }
}
