//! The console's page shell and formatting helpers. Every value that
//! reaches a page goes through [`esc`] (text and attribute values alike).

use super::session::Session;
use super::BASE;
use axum::response::Html;
use serde_json::Value;

/// Escapes `s` for HTML text and double- or single-quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON string field (escaped), or `""`.
pub fn s(v: &Value, key: &str) -> String {
    esc(v[key].as_str().unwrap_or_default())
}

fn head(title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Gantry</title>\
         <link rel=\"icon\" href=\"data:,\">\
         <link rel=\"stylesheet\" href=\"{BASE}/assets/console.css\">\
         <script src=\"{BASE}/assets/console.js\" defer></script></head>",
        esc(title)
    )
}

/// A page without navigation (sign-in, errors).
pub fn bare_page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "{}<body><main id=\"main\">{body}</main></body></html>",
        head(title)
    ))
}

/// Which navigation entry a page belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Instances,
    Snapshots,
    Admin,
}

/// A signed-in page: navigation, the sign-out form, an optional notice
/// (`msg`, shown escaped), then `body`.
pub fn page(s: &Session, title: &str, nav: Nav, msg: Option<&str>, body: &str) -> Html<String> {
    let link = |n: Nav, href: &str, label: &str| {
        let cur = if n == nav {
            " aria-current=\"page\""
        } else {
            ""
        };
        format!("<a href=\"{BASE}{href}\"{cur}>{label}</a>")
    };
    let admin = if s.admin {
        link(Nav::Admin, "/admin", "Admin")
    } else {
        String::new()
    };
    let who = match &s.account {
        Some(a) => format!("account {}", esc(a)),
        None => "admin".to_string(),
    };
    let notice = msg
        .filter(|m| !m.is_empty())
        .map(|m| {
            format!(
                "<p class=\"notice\" role=\"status\" id=\"notice\">{}</p>",
                esc(m)
            )
        })
        .unwrap_or_default();
    Html(format!(
        "{head}<body><header class=\"top\"><a class=\"brand\" href=\"{BASE}/instances\">Gantry</a>\
         <nav aria-label=\"Main\">{i}{sn}{admin}</nav>\
         <form method=\"post\" action=\"{BASE}/sign-out\" class=\"signout\">{csrf}\
         <span class=\"muted\">{who}</span> <button type=\"submit\" id=\"sign-out\">Sign out</button></form>\
         </header><main id=\"main\" data-csrf=\"{csrf_v}\"><h1>{t}</h1>{notice}{body}</main></body></html>",
        head = head(title),
        i = link(Nav::Instances, "/instances", "My Instances"),
        sn = link(Nav::Snapshots, "/snapshots", "Snapshots"),
        csrf = s.csrf_field(),
        csrf_v = esc(&s.csrf),
        t = esc(title),
    ))
}

/// The display currency sign; amounts are kept in micros of one unit.
pub const CURRENCY: &str = "$";

/// Micros of the currency unit as money: `$1.2346`.
pub fn money(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    // Rounded to ten-thousandths of the unit.
    let t = (micros.unsigned_abs() + 50) / 100;
    format!("{sign}{CURRENCY}{}.{:04}", t / 10_000, t % 10_000)
}

/// A byte count for people: `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// An RFC 3339 time as `2026-12-01 17:05:03 UTC`.
pub fn time(v: &Value) -> String {
    match v.as_str() {
        Some(t) => match chrono::DateTime::parse_from_rfc3339(t) {
            Ok(d) => d
                .with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string(),
            Err(_) => esc(t),
        },
        None => String::new(),
    }
}

/// Any JSON value as a definition list (objects), list (arrays) or text.
pub fn json_dl(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut out = String::from("<dl class=\"kv\">");
            for (k, v) in m {
                out.push_str(&format!(
                    "<dt>{}</dt><dd>{}</dd>",
                    esc(&k.replace('_', " ")),
                    json_dl(v)
                ));
            }
            out + "</dl>"
        }
        Value::Array(a) if a.is_empty() => "<span class=\"muted\">none</span>".into(),
        Value::Array(a) => {
            let items: String = a
                .iter()
                .map(|v| format!("<li>{}</li>", json_dl(v)))
                .collect();
            format!("<ul>{items}</ul>")
        }
        Value::Null => "<span class=\"muted\">—</span>".into(),
        Value::String(s) => esc(s),
        other => esc(&other.to_string()),
    }
}

/// One tab of a tab bar: label, link, whether it is the current one and
/// whether it is available (an unavailable tab is a disabled button).
pub struct Tab<'a> {
    pub label: &'a str,
    pub href: String,
    pub current: bool,
    pub enabled: bool,
}

/// A tab bar (`role="tablist"` is not used: these are links to pages).
pub fn tabs(label: &str, items: &[Tab]) -> String {
    let mut out = format!("<nav class=\"tabs\" aria-label=\"{}\">", esc(label));
    for t in items {
        let slug = t.label.to_ascii_lowercase().replace(' ', "-");
        if !t.enabled {
            out.push_str(&format!(
                "<button type=\"button\" class=\"tab\" id=\"tab-{slug}\" disabled \
                 title=\"not available in this state\">{}</button>",
                esc(t.label)
            ));
        } else {
            let cur = if t.current {
                " aria-current=\"page\""
            } else {
                ""
            };
            out.push_str(&format!(
                "<a class=\"tab\" id=\"tab-{slug}\" href=\"{}\"{cur}>{}</a>",
                esc(&t.href),
                esc(t.label)
            ));
        }
    }
    out + "</nav>"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<a href='x'>\"&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&quot;&amp;&quot;&lt;/a&gt;"
        );
        assert_eq!(
            json_dl(&serde_json::json!({"k": "<b>"})),
            "<dl class=\"kv\"><dt>k</dt><dd>&lt;b&gt;</dd></dl>"
        );
    }

    #[test]
    fn money_is_in_units() {
        assert_eq!(money(1_234_567), "$1.2346");
        assert_eq!(money(0), "$0.0000");
        assert_eq!(money(-50), "-$0.0001");
        assert_eq!(money(999_999), "$1.0000");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
