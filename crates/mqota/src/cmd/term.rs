//! Printing what devices say, safely: ids, projects, versions, job ids and
//! error texts come from the devices (anyone who can publish on their
//! topics), so before they reach a terminal every control character and
//! every bidirectional-text override is written out as an escape (`\u{1b}`,
//! `\u{202e}`): a status cannot clear the screen, recolour it, or make one
//! id read as another.

use std::borrow::Cow;

/// Characters that reorder or hide text around them (Unicode bidi
/// controls and marks; the "Trojan Source" set, CVE-2021-42574).
fn is_bidi(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// `s` with control characters (C0, DEL, C1) and bidi controls escaped as
/// `\u{..}`; unchanged (borrowed) when there are none.
pub fn safe(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() || is_bidi(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() || is_bidi(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// "1 device", "2 devices".
pub fn devices(n: usize) -> String {
    if n == 1 {
        "1 device".to_owned()
    } else {
        format!("{n} devices")
    }
}

/// At most `max` ids, made safe and comma-separated, then "and N more": a
/// stage of a thousand devices is one readable line, not a thousand ids.
pub fn id_list<S: AsRef<str>>(ids: &[S], max: usize) -> String {
    let mut out = ids
        .iter()
        .take(max)
        .map(|s| safe(s.as_ref()).into_owned())
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > max {
        out.push_str(&format!(" and {} more", ids.len() - max));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_bidi_overrides_are_escaped_and_the_rest_kept() {
        assert!(matches!(safe("dev-01 1.1.0 ünï"), Cow::Borrowed(_)));
        assert_eq!(safe("a\x1b[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(safe("x\ny\r\t"), "x\\u{a}y\\u{d}\\u{9}");
        assert_eq!(safe("\u{9b}31m"), "\\u{9b}31m", "C1 CSI");
        assert_eq!(safe("\x7f"), "\\u{7f}");
        assert_eq!(safe("ab\u{202e}dc"), "ab\\u{202e}dc");
        assert_eq!(
            safe("\u{2066}\u{2069}\u{200f}"),
            "\\u{2066}\\u{2069}\\u{200f}"
        );
    }

    #[test]
    fn counts_read_as_english_and_long_id_lists_are_cut() {
        assert_eq!(devices(1), "1 device");
        assert_eq!(devices(0), "0 devices");
        assert_eq!(devices(2), "2 devices");
        let ids: Vec<String> = (0..1000).map(|i| format!("d{i}")).collect();
        assert_eq!(id_list(&ids, 3), "d0, d1, d2 and 997 more");
        assert_eq!(id_list(&ids[..2], 3), "d0, d1");
        assert_eq!(id_list(&["a\x1b"], 3), "a\\u{1b}");
    }
}
