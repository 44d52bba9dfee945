//! The strings every flow carries (times, addresses, ids), written digit by
//! digit: times and ids into one allocation, addresses and MACs into a
//! stack buffer made an inline string (no allocation at all). They run for
//! every flow; `format!` costs several times as much (its formatting
//! machinery, and the allocations it grows through).

use std::net::Ipv4Addr;

use crate::record::InlineText;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `v` in decimal, zero-padded to at least `width` digits, written into
/// `buf` (no allocation).
pub fn dec(buf: &mut [u8; 20], v: u64, width: usize) -> &str {
    buf.fill(b'0');
    let (mut v, mut i) = (v, buf.len());
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let start = i.min(buf.len().saturating_sub(width));
    std::str::from_utf8(&buf[start..]).expect("ASCII digits")
}

/// Appends `v` in decimal, zero-padded to at least `width` digits.
pub fn push_dec(s: &mut String, v: u64, width: usize) {
    s.push_str(dec(&mut [0; 20], v, width));
}

/// Appends the low `digits` hex digits of `v` (lower case).
pub fn push_hex(s: &mut String, v: u64, digits: u32) {
    for d in (0..digits.min(16)).rev() {
        s.push(char::from(HEX[((v >> (d * 4)) & 0xf) as usize]));
    }
}

/// `10.0.0.1`, as `Ipv4Addr`'s `Display` writes it (inline: no
/// allocation; written into a buffer first, as the inline string's own
/// push goes a character at a time).
pub fn ipv4(ip: Ipv4Addr) -> InlineText {
    let mut buf = [0u8; 15];
    let mut n = 0;
    for (i, o) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        for (place, digit) in [(100, o / 100), (10, o / 10 % 10), (1, o % 10)] {
            if o >= place || place == 1 {
                buf[n] = b'0' + digit;
                n += 1;
            }
        }
    }
    InlineText::from(std::str::from_utf8(&buf[..n]).expect("ASCII digits"))
}

/// `02:00:00:00:01:0a` (inline: no allocation).
pub fn mac(m: &[u8; 6]) -> InlineText {
    let mut buf = [b':'; 17];
    for (i, b) in m.iter().enumerate() {
        buf[i * 3] = HEX[usize::from(b >> 4)];
        buf[i * 3 + 1] = HEX[usize::from(b & 0xf)];
    }
    InlineText::from(std::str::from_utf8(&buf).expect("ASCII hex"))
}

/// A flow's id: `xxxxxxxx-0000-4000-800v-nnnnnnnnnnnn`, from a per-source
/// prefix, the source's variant digit and a counter (unique per agent run).
pub fn flow_uuid(prefix: u32, variant: u8, n: u64) -> String {
    let mut s = String::with_capacity(36);
    push_hex(&mut s, prefix.into(), 8);
    s.push_str("-0000-4000-800");
    push_hex(&mut s, variant.into(), 1);
    s.push('-');
    push_hex(&mut s, n, 12);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_match_std_formatting() {
        for v in [0u64, 7, 10, 99, 255, 1_000_000_007, u64::MAX] {
            for w in [1, 2, 4, 9, 20] {
                let mut s = String::new();
                push_dec(&mut s, v, w);
                assert_eq!(s, format!("{v:0w$}"));
                assert_eq!(dec(&mut [b'7'; 20], v, w), s, "stale digits");
            }
            let mut s = String::new();
            push_hex(&mut s, v, 12);
            assert_eq!(s, format!("{:012x}", v & 0xffff_ffff_ffff));
        }
        for ip in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(10, 198, 0, 4),
            Ipv4Addr::new(100, 9, 10, 109),
            Ipv4Addr::BROADCAST,
        ] {
            assert_eq!(ipv4(ip), ip.to_string());
        }
        assert_eq!(mac(&[2, 0, 0xab, 0, 1, 0x0a]), "02:00:ab:00:01:0a");
        assert_eq!(
            flow_uuid(0xdeadbeef, 7, 0x1234),
            format!("{:08x}-0000-4000-8007-{:012x}", 0xdeadbeefu32, 0x1234)
        );
    }
}
