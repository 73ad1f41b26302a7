//! Training curves as a self-contained SVG (loss, and action accuracy when logged), written
//! next to the checkpoints.

use crate::error::Result;
use crate::io::write_atomic;
use crate::log::MetricsRecord;
use std::fmt::Write;
use std::path::Path;

const W: f64 = 720.0;
const PANEL_H: f64 = 240.0;
const ML: f64 = 64.0;
const MR: f64 = 20.0;
const MT: f64 = 34.0;
const MB: f64 = 36.0;

fn nice_range(lo: f64, hi: f64) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if (hi - lo).abs() < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

fn panel(
    svg: &mut String,
    top: f64,
    title: &str,
    color: &str,
    points: &[(f64, f64)],
    fixed: Option<(f64, f64)>,
) {
    let h = PANEL_H - MT - MB;
    let pw = W - ML - MR;
    let (x0, x1) = match (points.first(), points.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => (a.0, b.0),
        (Some(a), _) => (a.0 - 1.0, a.0 + 1.0),
        _ => (0.0, 1.0),
    };
    let (y0, y1) = fixed.unwrap_or_else(|| {
        let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        nice_range(lo, hi)
    });
    let sx = |x: f64| ML + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + MT + h - (y - y0) / (y1 - y0) * h;
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="{}" font-size="14" font-weight="bold">{title}</text>"##,
        ML,
        top + 20.0
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{ML}" y="{}" width="{pw}" height="{h}" fill="none" stroke="#999"/>"##,
        top + MT
    );
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        let py = sy(y);
        let _ = writeln!(
            svg,
            r##"<line x1="{ML}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            ML + pw,
            ML - 6.0,
            py + 4.0,
            fmt_num(y)
        );
        let x = x0 + (x1 - x0) * i as f64 / 4.0;
        let px = sx(x);
        let _ = writeln!(
            svg,
            r##"<text x="{px:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"##,
            top + MT + h + 16.0,
            x.round() as i64
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">step</text>"##,
        ML + pw / 2.0,
        top + MT + h + 30.0
    );
    if points.is_empty() {
        return;
    }
    let mut d = String::new();
    for (i, (x, y)) in points.iter().enumerate() {
        let _ = write!(
            d,
            "{}{:.2},{:.2} ",
            if i == 0 { "M" } else { "L" },
            sx(*x),
            sy(y.clamp(y0, y1))
        );
    }
    let _ = writeln!(
        svg,
        r##"<path d="{}" fill="none" stroke="{color}" stroke-width="1.5"/>"##,
        d.trim_end()
    );
}

fn fmt_num(y: f64) -> String {
    if y.abs() >= 100.0 {
        format!("{y:.0}")
    } else if y.abs() >= 1.0 {
        format!("{y:.2}")
    } else {
        format!("{y:.3}")
    }
}

/// A panel under the loss: title, colour, points, fixed y range.
type Panel<'a> = (&'a str, &'a str, &'a [(f64, f64)], Option<(f64, f64)>);

/// Renders the curves of `records` as an SVG document.
pub fn render_svg(records: &[MetricsRecord], title: &str) -> String {
    let loss: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.loss.is_finite())
        .map(|r| (r.step as f64, r.loss))
        .collect();
    let acc: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.action_accuracy.map(|a| (r.step as f64, a)))
        .collect();
    let l1: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.action_l1_loss.map(|a| (r.step as f64, a)))
        .collect();
    let aux: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.aux_l1_loss.map(|a| (r.step as f64, a)))
        .collect();
    // Panels after the loss: the action-token accuracy (256-bin objective), the current
    // action's L1 error (every objective that reports it) and the auxiliary head's L1
    // (`--aux-environment-state`).
    let mut panels: Vec<Panel<'_>> = Vec::new();
    if !acc.is_empty() {
        panels.push(("action-token accuracy", "#d62728", &acc, Some((0.0, 1.0))));
    }
    if !l1.is_empty() {
        panels.push(("action L1 (current action)", "#2ca02c", &l1, None));
    }
    if !aux.is_empty() {
        panels.push((
            "environment-state L1 (auxiliary head)",
            "#9467bd",
            &aux,
            None,
        ));
    }
    let height = PANEL_H * (1 + panels.len()) as f64 + 24.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif">"##
    );
    let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="white"/>"##);
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="16" font-size="12" fill="#555">{}</text>"##,
        ML,
        escape(title)
    );
    panel(&mut svg, 24.0, "training loss", "#1f77b4", &loss, None);
    for (i, (title, color, points, fixed)) in panels.into_iter().enumerate() {
        panel(
            &mut svg,
            24.0 + PANEL_H * (i + 1) as f64,
            title,
            color,
            points,
            fixed,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes `curves.svg` atomically.
pub fn write_svg(path: &Path, records: &[MetricsRecord], title: &str) -> Result<()> {
    write_atomic(path, render_svg(records, title).as_bytes())
}
