//! Validation of a candidate after its regex matched: what a format
//! allows to check (a checksum, an issuer, a parser's verdict) decides
//! whether digits are a card number or a go.sum pseudo-version, a phone
//! number or a timestamp. A validator sees the bytes around the match too
//! (`123.4111111111111111` is a float, not a card) and may shorten the
//! span to the longest prefix that is valid (an IBAN followed by a word).
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Validator {
    /// Only the Luhn check over 13–19 digits (what `luhn: true` meant).
    Luhn,
    /// A payment card number: issuer prefix and length, Luhn, and either
    /// no separators or one kind in a printed card layout.
    Card,
    /// An IBAN: country, length and the mod-97 check (`iban_validate`).
    Iban,
    /// A US social security number: area, group and serial rules.
    UsSsn,
    /// A phone number valid for its country (`phonenumber`, libphonenumber's
    /// metadata); national numbers are read in the pattern's `region`.
    Phone,
    /// A UK National Insurance number: prefix letters in use.
    UkNino,
    /// A Spanish DNI or NIE: the control letter.
    EsDni,
    /// A Brazilian CPF: both check digits.
    BrCpf,
    /// An Indian Aadhaar number: the Verhoeff check digit.
    InAadhaar,
    /// A Canadian social insurance number: Luhn over nine digits.
    CaSin,
    /// An IPv4 address that is not part of a longer dotted version.
    Ipv4,
    /// An IPv6 address, as `std` parses it.
    Ipv6,
    /// A hard-coded password written with symbols (`P@ss:w0rd!`), not
    /// code, a template or a pattern: see [`password`].
    Password,
}

impl Validator {
    pub fn name(self) -> &'static str {
        match self {
            Validator::Luhn => "luhn",
            Validator::Card => "card",
            Validator::Iban => "iban",
            Validator::UsSsn => "us-ssn",
            Validator::Phone => "phone",
            Validator::UkNino => "uk-nino",
            Validator::EsDni => "es-dni",
            Validator::BrCpf => "br-cpf",
            Validator::InAadhaar => "in-aadhaar",
            Validator::CaSin => "ca-sin",
            Validator::Ipv4 => "ipv4",
            Validator::Ipv6 => "ipv6",
            Validator::Password => "password",
        }
    }

    /// The end of the valid candidate in `data[start..end]` (`end` itself,
    /// or an earlier separator for validators that shorten), or `None`.
    pub fn check(
        self,
        data: &[u8],
        start: usize,
        end: usize,
        region: Option<phonenumber::country::Id>,
    ) -> Option<usize> {
        let s = &data[start..end];
        let ok = match self {
            Validator::Luhn => luhn_digits(s),
            Validator::Card => {
                card(s) && !inside_number(data, start, end) && !in_group_table(data, start, end)
            }
            Validator::UsSsn => us_ssn(s) && !inside_number(data, start, end),
            Validator::UkNino => uk_nino(s),
            Validator::EsDni => es_dni(s),
            Validator::BrCpf => br_cpf(s) && !inside_number(data, start, end),
            Validator::InAadhaar => verhoeff(&digits(s)) && !inside_number(data, start, end),
            Validator::CaSin => ca_sin(s) && !inside_number(data, start, end),
            Validator::Ipv4 => ipv4(s) && !inside_number(data, start, end),
            Validator::Ipv6 => std::str::from_utf8(s).is_ok_and(|t| {
                t.parse::<Ipv6Addr>().is_ok()
                    && (t.contains("::") || t.matches(':').count() == 7)
                    && t.bytes().any(|b| b.is_ascii_digit())
            }),
            Validator::Password => password(s),
            Validator::Iban => return shortest_valid(data, start, end, iban),
            Validator::Phone => {
                return shortest_valid(data, start, end, |t| phone(t, region))
                    .filter(|_| !inside_number(data, start, end))
            }
        };
        ok.then_some(end)
    }
}

/// The longest prefix of the candidate, ending before a separator or at
/// its end, that `valid` accepts (greedy groups may take a following word).
fn shortest_valid(
    data: &[u8],
    start: usize,
    end: usize,
    valid: impl Fn(&str) -> bool,
) -> Option<usize> {
    let text = std::str::from_utf8(&data[start..end]).ok()?;
    let mut ends: Vec<usize> = text
        .char_indices()
        .filter(|(_, c)| matches!(c, ' ' | '-' | '.'))
        .map(|(i, _)| i)
        .collect();
    ends.push(text.len());
    ends.into_iter()
        .rev()
        .find(|&e| valid(&text[..e]))
        .map(|e| start + e)
}

/// Digits glued to the candidate by `.`, `-`, `_`, `/` or more digits:
/// part of a longer number (a float, a version, a timestamp, a path).
fn inside_number(data: &[u8], start: usize, end: usize) -> bool {
    let glue = |b: u8| matches!(b, b'.' | b'-' | b'_' | b'/' | b'+' | b':');
    let before = start.checked_sub(1).map(|i| data[i]);
    let before2 = start.checked_sub(2).map(|i| data[i]);
    let after = data.get(end).copied();
    let after2 = data.get(end + 1).copied();
    before.is_some_and(|b| b.is_ascii_digit())
        || after.is_some_and(|b| b.is_ascii_digit())
        || (before.is_some_and(glue) && before2.is_some_and(|b| b.is_ascii_alphanumeric()))
        || (after.is_some_and(glue) && after2.is_some_and(|b| b.is_ascii_alphanumeric()))
}

/// Groups printed like a card's inside a longer run of such groups
/// (`54FF 5500 5501 5502 5503 5504`: a code-point table, a hex dump): the
/// token beyond the separator on either side is another 4-5 character
/// hex group with a digit.
fn in_group_table(data: &[u8], start: usize, end: usize) -> bool {
    let Some(&sep) = data[start..end].iter().find(|b| !b.is_ascii_digit()) else {
        return false;
    };
    let group = |t: &[u8]| {
        (4..=5).contains(&t.len())
            && t.iter().all(u8::is_ascii_hexdigit)
            && t.iter().any(u8::is_ascii_digit)
    };
    let before = start.checked_sub(1).filter(|&i| data[i] == sep).map(|i| {
        let from = data[..i]
            .iter()
            .rposition(|b| !b.is_ascii_alphanumeric())
            .map_or(0, |p| p + 1);
        &data[from..i]
    });
    let after = (data.get(end) == Some(&sep)).then(|| {
        let to = data[end + 1..]
            .iter()
            .position(|b| !b.is_ascii_alphanumeric())
            .map_or(data.len(), |p| end + 1 + p);
        &data[end + 1..to]
    });
    before.is_some_and(group) || after.is_some_and(group)
}

fn digits(s: &[u8]) -> Vec<u8> {
    s.iter()
        .filter(|b| b.is_ascii_digit())
        .map(|b| b - b'0')
        .collect()
}

fn luhn(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 {
                    y - 9
                } else {
                    y
                }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn luhn_digits(s: &[u8]) -> bool {
    let d = digits(s);
    (13..=19).contains(&d.len()) && luhn(&d)
}

/// Issuer prefixes and the lengths each issues (ISO/IEC 7812 ranges of
/// the networks in use).
fn issuer_allows(d: &[u8]) -> bool {
    let n = d.len();
    let prefix = |k: usize| d[..k].iter().fold(0u32, |a, &x| a * 10 + u32::from(x));
    if n < 13 {
        return false;
    }
    let (p2, p3, p4, p6) = (prefix(2), prefix(3), prefix(4), prefix(6));
    match d[0] {
        4 => matches!(n, 13 | 16 | 19),                             // Visa
        5 if (51..=55).contains(&p2) => n == 16,                    // Mastercard
        5 if p2 == 50 || (56..=59).contains(&p2) => n >= 13,        // Maestro
        2 if (2221..=2720).contains(&p4) => n == 16,                // Mastercard 2-series
        2 if (2200..=2204).contains(&p4) => (16..=19).contains(&n), // Mir
        3 if p2 == 34 || p2 == 37 => n == 15,                       // Amex
        3 if (300..=305).contains(&p3) || p4 == 3095 || p2 == 36 || p2 == 38 || p2 == 39 => {
            (14..=19).contains(&n) // Diners
        }
        3 if (3528..=3589).contains(&p4) => (16..=19).contains(&n), // JCB
        6 if p4 == 6011 || (644..=649).contains(&p3) || p2 == 65 => (16..=19).contains(&n), // Discover
        6 if (622126..=622925).contains(&p6) || p2 == 62 => (16..=19).contains(&n), // UnionPay
        6 if p2 == 60 || p2 == 63 || p2 == 64 || p2 == 66 || p2 == 67 || p2 == 68 || p2 == 69 => {
            n >= 13 // Maestro, RuPay
        }
        8 if p2 == 81 || p2 == 82 => n == 16, // UnionPay, RuPay
        _ => false,
    }
}

/// Separators: none, or one kind (space or dash) between groups of a
/// printed layout (4-4-4-4, 4-4-4-4-3, 4-6-5, 4-6-4; the last group of a
/// 4-grouped number may be short).
fn card_layout(s: &[u8]) -> bool {
    let seps: Vec<u8> = s.iter().copied().filter(|b| !b.is_ascii_digit()).collect();
    if seps.is_empty() {
        return true;
    }
    if seps.iter().any(|&b| b != seps[0]) {
        return false;
    }
    let groups: Vec<usize> = s.split(|&b| b == seps[0]).map(<[u8]>::len).collect();
    let fours = groups.len() >= 2
        && groups[..groups.len() - 1].iter().all(|&g| g == 4)
        && (1..=4).contains(groups.last().unwrap_or(&0));
    fours || groups == [4, 6, 5] || groups == [4, 6, 4]
}

fn card(s: &[u8]) -> bool {
    let d = digits(s);
    card_layout(s) && issuer_allows(&d) && luhn(&d) && !d.iter().all(|&x| x == d[0])
}

fn us_ssn(s: &[u8]) -> bool {
    let d = digits(s);
    if d.len() != 9 {
        return false;
    }
    let area = u32::from(d[0]) * 100 + u32::from(d[1]) * 10 + u32::from(d[2]);
    let group = u32::from(d[3]) * 10 + u32::from(d[4]);
    let serial = d[5..].iter().fold(0u32, |a, &x| a * 10 + u32::from(x));
    // Never issued: area 000, 666, 900-999; group 00; serial 0000; and
    // the two numbers printed in advertising (078-05-1120, 219-09-9999),
    // plus the placeholder everyone writes.
    let known = [(78, 5, 1120), (219, 9, 9999), (123, 45, 6789)];
    area != 0
        && area != 666
        && area < 900
        && group != 0
        && serial != 0
        && !known.contains(&(area, group, serial))
}

fn uk_nino(s: &[u8]) -> bool {
    let letters: Vec<u8> = s
        .iter()
        .filter(|b| b.is_ascii_alphabetic())
        .map(u8::to_ascii_uppercase)
        .collect();
    if letters.len() != 3 {
        return false;
    }
    let prefix = [letters[0], letters[1]];
    // Prefixes never allocated (HMRC's NIM39110).
    !matches!(
        &prefix,
        b"BG" | b"GB" | b"KN" | b"NK" | b"NT" | b"TN" | b"ZZ"
    ) && !digits(s).iter().all(|&x| x == 0)
}

fn es_dni(s: &[u8]) -> bool {
    const LETTERS: &[u8; 23] = b"TRWAGMYFPDXBNJZSQVHLCKE";
    let t: Vec<u8> = s.iter().copied().filter(|&b| b != b'-').collect();
    let (Some(&letter), Some(&first)) = (t.last(), t.first()) else {
        return false;
    };
    let lead = match first.to_ascii_uppercase() {
        b'X' => Some(0),
        b'Y' => Some(1),
        b'Z' => Some(2),
        _ => None,
    };
    let body = &t[usize::from(lead.is_some())..t.len() - 1];
    if body.iter().any(|b| !b.is_ascii_digit()) {
        return false;
    }
    let n = body.iter().fold(lead.unwrap_or(0) as u64, |a, &b| {
        a * 10 + u64::from(b - b'0')
    });
    LETTERS[(n % 23) as usize] == letter.to_ascii_uppercase() && n % 100_000_000 != 0
}

fn br_cpf(s: &[u8]) -> bool {
    let d = digits(s);
    if d.len() != 11 || d.iter().all(|&x| x == d[0]) {
        return false;
    }
    let check = |n: usize| {
        let sum: u32 = (0..n)
            .map(|i| u32::from(d[i]) * (n as u32 + 1 - i as u32))
            .sum();
        let r = (sum * 10) % 11;
        (if r == 10 { 0 } else { r }) == u32::from(d[n])
    };
    check(9) && check(10)
}

/// The Verhoeff check (dihedral group D5), Aadhaar's check digit.
fn verhoeff(d: &[u8]) -> bool {
    const D: [[u8; 10]; 10] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
        [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
        [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
        [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
        [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
        [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
        [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
        [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
    ];
    const P: [[u8; 10]; 8] = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
        [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
        [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
        [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
        [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
        [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
        [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
    ];
    if d.len() != 12 || d[0] < 2 {
        return false;
    }
    let c = d.iter().rev().enumerate().fold(0u8, |c, (i, &x)| {
        D[c as usize][P[i % 8][x as usize] as usize]
    });
    c == 0
}

fn ca_sin(s: &[u8]) -> bool {
    let d = digits(s);
    let seps: Vec<u8> = s.iter().copied().filter(|b| !b.is_ascii_digit()).collect();
    d.len() == 9
        && seps.windows(2).all(|w| w[0] == w[1])
        && !matches!(d[0], 0 | 8)
        && luhn(&d)
        && !d.iter().all(|&x| x == d[0])
}

fn ipv4(s: &[u8]) -> bool {
    std::str::from_utf8(s).is_ok_and(|t| t.parse::<Ipv4Addr>().is_ok())
}

fn iban(t: &str) -> bool {
    t.parse::<iban::Iban>().is_ok()
}

fn phone(t: &str, region: Option<phonenumber::country::Id>) -> bool {
    // A number with its country code stands alone; without, the region
    // reads it. The parser accepts digit runs a person would never write
    // as a phone number only if they are valid numbers of that country.
    phonenumber::parse(region, t).is_ok_and(|n| n.is_valid())
}

/// A password a person typed, told from code by its symbols: at least one
/// letter or digit, three or more kinds of symbol (`_` is part of names,
/// not one), and brackets that do not nest. Code, templates (`{{x}}`,
/// `${x}`), regular expressions (`[a-z]+`) and JSON all nest theirs; a
/// password such as `m{{h}o)p${e]nob(` does not, and one without brackets
/// needs the symbols alone (`A,.:-@*?!`). What else looks like this
/// (addresses, paths, globs, format strings) the pattern's `deny` names.
fn password(s: &[u8]) -> bool {
    let Ok(t) = std::str::from_utf8(s) else {
        return false;
    };
    let chars = t.chars().count();
    if !(8..=128).contains(&chars) || t.chars().any(char::is_whitespace) {
        return false;
    }
    if !t.chars().any(char::is_alphanumeric) {
        return false;
    }
    let mut kinds: Vec<char> = t
        .chars()
        .filter(|c| !c.is_alphanumeric() && *c != '_')
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    kinds.len() >= 3 && !brackets_nest(t)
}

/// Whether `t` has brackets and every one closes the last one opened.
fn brackets_nest(t: &str) -> bool {
    let mut open = Vec::new();
    let mut any = false;
    for c in t.chars() {
        match c {
            '(' | '[' | '{' => {
                any = true;
                open.push(c);
            }
            ')' | ']' | '}' => {
                any = true;
                let want = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if open.pop() != Some(want) {
                    return false;
                }
            }
            _ => {}
        }
    }
    any && open.is_empty()
}

/// A country for `phone`, as ISO 3166 alpha-2 (`US`, `DE`).
pub fn region(code: &str) -> Result<phonenumber::country::Id, String> {
    code.to_ascii_uppercase()
        .parse()
        .map_err(|_| format!("`{code}` is not an ISO 3166 alpha-2 country code"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(v: Validator, s: &str) -> bool {
        v.check(s.as_bytes(), 0, s.len(), region("US").ok()) == Some(s.len())
    }

    /// The candidate `mid` inside `before..after`.
    fn ok_in(v: Validator, before: &str, mid: &str, after: &str) -> bool {
        let t = format!("{before}{mid}{after}");
        v.check(t.as_bytes(), before.len(), before.len() + mid.len(), None)
            .is_some()
    }

    #[test]
    fn cards_need_an_issuer_a_layout_and_luhn() {
        for good in [
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "5555555555554444",
            "2223003122003222",
            "378282246310005",
            "3782 822463 10005",
            "6011111111111117",
            "3530111333300000",
            "6200000000000005",
        ] {
            assert!(ok(Validator::Card, good), "{good}");
        }
        for bad in [
            // Luhn passes, no issuer: go.sum pseudo-version digits.
            "0-20220319035150",
            "1234567812345670",
            "9111111111111115",
            "4111 1111-1111 1111", // mixed separators
            "41 11111111 111111",  // not a printed layout
            "4111111111111112",    // Luhn
            "5105105105105100 1",
        ] {
            assert!(!ok(Validator::Card, bad), "{bad}");
        }
        // A float, a version, a hex-suffixed go.sum time: not a card.
        assert!(!ok_in(Validator::Card, "x = 0.", "4111111111111111", ";"));
        assert!(!ok_in(
            Validator::Card,
            "v0.0.0-",
            "4111111111111111",
            "-800ac71e25c2"
        ));
        assert!(ok_in(Validator::Card, "card: ", "4111111111111111", "."));
        assert!(ok_in(Validator::Card, "(", "4111 1111 1111 1111", ")"));
        // A code-point table or hex dump, not a card.
        assert!(!ok_in(
            Validator::Card,
            "54FE 54FF ",
            "5500 5501 5502 5503",
            " 5504"
        ));
        assert!(!ok_in(Validator::Card, "", "4111 1111 1111 1111", " 0A3F"));
        assert!(ok_in(
            Validator::Card,
            "pay ",
            "4111 1111 1111 1111",
            " exp 12/29"
        ));
    }

    #[test]
    fn national_identifiers_by_their_rules() {
        assert!(ok(Validator::UsSsn, "536-22-1234"));
        for bad in [
            "000-12-3456",
            "666-12-3456",
            "912-12-3456",
            "536-00-1234",
            "536-22-0000",
            "078-05-1120",
        ] {
            assert!(!ok(Validator::UsSsn, bad), "{bad}");
        }
        assert!(ok(Validator::UkNino, "AB 12 34 56 C"));
        assert!(!ok(Validator::UkNino, "GB 12 34 56 C"));
        assert!(ok(Validator::EsDni, "12345678Z"));
        assert!(ok(Validator::EsDni, "X1234567L"));
        assert!(!ok(Validator::EsDni, "12345678A"));
        assert!(ok(Validator::BrCpf, "529.982.247-25"));
        assert!(!ok(Validator::BrCpf, "529.982.247-26"));
        assert!(!ok(Validator::BrCpf, "111.111.111-11"));
        assert!(ok(Validator::InAadhaar, "2341 2341 2346"));
        assert!(!ok(Validator::InAadhaar, "2341 2341 2345"));
        assert!(ok(Validator::CaSin, "130 692 544"));
        assert!(!ok(Validator::CaSin, "130 692 545"));
    }

    #[test]
    fn ibans_by_mod_97_and_shortened_to_the_valid_part() {
        assert!(ok(Validator::Iban, "DE44500105175407324931"));
        assert!(ok(Validator::Iban, "GB82 WEST 1234 5698 7654 32"));
        assert!(!ok(Validator::Iban, "DE44500105175407324932"));
        let t = "GB82 WEST 1234 5698 7654 32 THEN";
        assert_eq!(
            Validator::Iban.check(t.as_bytes(), 0, t.len(), None),
            Some(27)
        );
    }

    #[test]
    fn phone_numbers_by_libphonenumber() {
        assert!(ok(Validator::Phone, "+1 650-253-0000"));
        assert!(ok(Validator::Phone, "+44 20 7031 3000"));
        assert!(ok(Validator::Phone, "(650) 253-0000"));
        assert!(!ok(Validator::Phone, "+1 111-111-1111"));
        assert!(!ok(Validator::Phone, "+99 123 456"));
    }

    #[test]
    fn addresses_not_versions() {
        assert!(ok(Validator::Ipv4, "192.168.10.20"));
        assert!(!ok(Validator::Ipv4, "300.1.1.1"));
        assert!(!ok_in(Validator::Ipv4, "version ", "1.2.3.4", ".5"));
        assert!(ok(Validator::Ipv6, "2001:db8::1"));
        assert!(ok(Validator::Ipv6, "fe80:0:0:0:0:0:0:1"));
        assert!(!ok(Validator::Ipv6, "12:34:56"));
        assert!(!ok(Validator::Ipv6, "ab::cd"));
    }

    #[test]
    fn passwords_by_their_symbols_not_code() {
        for good in [
            "m{{h}o)p${e]nob(ody[finds>-_$#thisone}}",
            "A,.:-\u{a8}@*\u{bf}?!",
            "P@ss:w0rd!",
            "Tr0ub4dor&3#!",
            "k3J9(x!Qz#",
        ] {
            assert!(ok(Validator::Password, good), "{good}");
        }
        for bad in [
            // Templates, patterns and code nest their brackets.
            "{{ .Values.password }}",
            "${DB_PASSWORD:-secret1}",
            "^[A-Za-z0-9!@#]{8,}$",
            "os.environ[\"X\"]",
            "get_password(user)",
            // Too few kinds of symbol: names, versions, dates.
            "my_password_field",
            "v1.2.3-beta.4",
            "2024-01-02",
            // No letter or digit at all.
            "!@#$%^&*()",
            // Short, or with spaces.
            "a!b@c#",
            "value with quotes and spaces",
        ] {
            assert!(!ok(Validator::Password, bad), "{bad}");
        }
    }
}
