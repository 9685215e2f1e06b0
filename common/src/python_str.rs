//! Python's `str()` of a JSON value, as `json.loads` would have made it: how TRL writes a
//! tool's result into the `tool` message (`content = str(result)`), so a program answering
//! `{"result": {"heads": 35}}` shows the policy `{'heads': 35}`, as a Python tool returning
//! that dict would under TRL, and an error `{'error': '…'}`.
//!
//! A string is itself; anything else is its `repr`: `True`, `False`, `None`, ints,
//! floats in Python's shortest round-trip form (`1e-05`, `1e+16`, `2.0`), strings quoted
//! and escaped as `repr` does (single quotes unless the text has one and no double quote),
//! lists `[a, b]` and dicts `{'k': v}` in their order. Characters Python does not print
//! (`str.isprintable`: controls, format characters, private use, separators other than the
//! space) are escaped as `\xhh`, `\uhhhh` or `\Uhhhhhhhh`, by Python 3.12's tables (Unicode
//! 15); unassigned code points are printed as they are. An integer past 64 bits arrives as
//! a float (serde_json's numbers), where Python would keep it whole.

use serde_json::Value;

/// `str(value)`.
pub fn python_str(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => python_repr(other),
    }
}

/// `repr(value)`.
pub fn python_repr(value: &Value) -> String {
    match value {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (None, Some(u), _) => u.to_string(),
            (_, _, Some(f)) => float_repr(f),
            _ => n.to_string(),
        },
        Value::String(s) => string_repr(s),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(python_repr).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(map) => {
            let items: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", string_repr(k), python_repr(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
    }
}

/// `repr(float)`: the shortest digits that round-trip, positional for exponents −4 to 15,
/// otherwise `d.ddde±XX`.
fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    // Rust's `{:e}` gives the same shortest digits: "-1.2345e-5", "1e16", "0e0".
    let sci = format!("{f:e}");
    let (mantissa, exponent) = sci.split_once('e').expect("{:e} has an exponent");
    let exponent: i32 = exponent.parse().expect("{:e}'s exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    if !(-4..16).contains(&exponent) {
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        return format!("{sign}{mantissa}e{exp_sign}{:02}", exponent.abs());
    }
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if exponent < 0 {
        let zeros = "0".repeat((-exponent - 1) as usize);
        return format!("{sign}0.{zeros}{digits}");
    }
    let point = exponent as usize + 1;
    if digits.len() <= point {
        format!("{sign}{digits}{}.0", "0".repeat(point - digits.len()))
    } else {
        format!("{sign}{}.{}", &digits[..point], &digits[point..])
    }
}

/// `repr(str)`.
fn string_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if printable(c) => out.push(c),
            c if (c as u32) <= 0xff => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push(quote);
    out
}

/// The assigned code points Python's `str.isprintable` rejects (categories Cc, Cf, Co, Zs
/// but the space, Zl, Zp), as inclusive ranges, from Python 3.12's `unicodedata`.
const NOT_PRINTABLE: &[(u32, u32)] = &[
    (0x0000, 0x001f),
    (0x007f, 0x00a0),
    (0x00ad, 0x00ad),
    (0x0600, 0x0605),
    (0x061c, 0x061c),
    (0x06dd, 0x06dd),
    (0x070f, 0x070f),
    (0x0890, 0x0891),
    (0x08e2, 0x08e2),
    (0x1680, 0x1680),
    (0x180e, 0x180e),
    (0x2000, 0x200f),
    (0x2028, 0x202f),
    (0x205f, 0x2064),
    (0x2066, 0x206f),
    (0x3000, 0x3000),
    (0xe000, 0xf8ff),
    (0xfeff, 0xfeff),
    (0xfff9, 0xfffb),
    (0x110bd, 0x110bd),
    (0x110cd, 0x110cd),
    (0x13430, 0x1343f),
    (0x1bca0, 0x1bca3),
    (0x1d173, 0x1d17a),
    (0xe0001, 0xe0001),
    (0xe0020, 0xe007f),
    (0xf0000, 0xffffd),
    (0x100000, 0x10fffd),
];

fn printable(c: char) -> bool {
    let c = c as u32;
    let i = NOT_PRINTABLE.partition_point(|&(_, last)| last < c);
    NOT_PRINTABLE.get(i).is_none_or(|&(first, _)| first > c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_as_python_writes_them() {
        for (f, s) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (2.0, "2.0"),
            (12.5, "12.5"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (-123.456, "-123.456"),
            (1e300, "1e+300"),
        ] {
            assert_eq!(float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn strings_lists_and_dicts_as_python_writes_them() {
        assert_eq!(python_str(&json!("plain 12")), "plain 12");
        assert_eq!(
            python_str(&json!({"error": "it's \"bad\"\n", "n": [1, 2.0, true, null]})),
            r#"{'error': 'it\'s "bad"\n', 'n': [1, 2.0, True, None]}"#
        );
        assert_eq!(python_repr(&json!("it's")), r#""it's""#);
        assert_eq!(
            python_repr(&json!("鸡\u{3000}兔\u{7}")),
            r"'鸡\u3000兔\x07'"
        );
        assert!(printable(' ') && !printable('\u{a0}') && !printable('\u{e0020}'));
    }
}
