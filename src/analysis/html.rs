//! Completions as an HTML page with the soft tokens highlighted (the chart
//! "text with soft tokens highlighted"): each completion under its prompt and
//! reference answer, soft tokens on orange, hard ones tinted blue by the
//! router's p_soft, and each token's p_soft, log-prob and entropy in its
//! tooltip. The same blocks draw as a picture in `plot_text`.
use super::plot_text::TextBlock;
use anyhow::Result;
use std::fmt::Write;
use std::io::Write as _;
use std::path::Path;

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub const STYLE: &str = "pre{white-space:pre-wrap;font-family:monospace;line-height:1.6}\
    .soft{background:#ffb347}.thought{color:#999}.context{color:#555;white-space:pre-wrap}";

pub const LEGEND: &str = "<p>Soft tokens (fed back as a top-k mixture) on orange; hard tokens \
    tinted blue by the router's p_soft. Hover a token for p_soft, log p and entropy.</p>\n";

/// The page: one section per block.
pub fn soft_text(blocks: &[TextBlock]) -> Result<String> {
    let mut h = format!(
        "<!doctype html><meta charset=\"utf-8\"><title>soft tokens</title>\n<style>\
         body{{font-family:sans-serif;max-width:60em;margin:2em auto}}{STYLE}</style>\n{LEGEND}"
    );
    h.push_str(&blocks_html(blocks)?);
    Ok(h)
}

/// The blocks alone, for pages that embed them (the run report).
pub fn blocks_html(blocks: &[TextBlock]) -> Result<String> {
    let mut h = String::new();
    for b in blocks {
        writeln!(h, "<h3>{}</h3>", escape(&b.heading))?;
        for c in &b.context {
            writeln!(h, "<div class=\"context\">{}</div>", escape(c))?;
        }
        h.push_str("<pre>");
        for t in &b.tokens {
            if t.thought {
                h.push_str(
                    "<span class=\"thought\" title=\"continuous thought (no token)\">·</span>",
                );
                continue;
            }
            let text = escape(&t.text);
            let tip = format!(
                "p_soft {:.3} · log p {:.3} · entropy {:.3}",
                t.p_soft, t.logp, t.entropy
            );
            if t.soft {
                write!(h, "<span class=\"soft\" title=\"{tip}\">{text}</span>")?;
            } else {
                let a = t.p_soft.clamp(0.0, 1.0) * 0.6;
                write!(h, "<span style=\"background:rgba(70,130,180,{a:.3})\" title=\"{tip}\">{text}</span>")?;
            }
        }
        h.push_str("</pre>\n");
    }
    Ok(h)
}

/// Writes the page atomically (parent directories created).
pub fn write(path: &Path, html: &str) -> Result<()> {
    super::frame::write_atomic(path, |f| Ok(f.write_all(html.as_bytes())?))
}
