//! `--plot DIR`: one SVG chart per suite that ran (`pin.svg`, `ring.svg`, `e2e.svg`,
//! `cache.svg`, `invalidate.svg`, `intercept.svg`, `vfio.svg`), each with the tool,
//! the date, the machine and the device in its footer.
//!
//! * figures with a shape get a line chart: map+unmap cost against size (pin, vfio:
//!   ours next to the raw kernel operation, with a panel of the ratio, which is what
//!   the README says to compare), NOP (NVMe: Flush) throughput against batch size;
//! * every other figure a bar, grouped by unit, its baseline beneath it and the ratio
//!   (or, for times, the added µs) written beside it.
//!
//! Medians with error bars from p10 to p90; sizes and times in human units (4 KiB …
//! 1 GiB, 250 ns … 1.5 ms); a log axis where the values span more than a decade.

use super::Measurement;
use crate::budget::human_bytes;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// What the footer says.
pub struct Meta {
    pub device: String,
    pub machine: String,
    pub date: String,
    pub tool: String,
}

const OURS: RGBColor = RGBColor(214, 39, 40);
const BASE: RGBColor = RGBColor(31, 119, 180);
const WIDTH: u32 = 960;

/// A value with its spread: median, p10, p90.
#[derive(Clone, Copy)]
struct Spread {
    med: f64,
    p10: f64,
    p90: f64,
}

fn spread(s: &super::measure::Sample, scale: f64) -> Spread {
    Spread {
        med: s.median() * scale,
        p10: s.pct(0.1) * scale,
        p90: s.pct(0.9) * scale,
    }
}

/// Significant digits for labels: 3 at most, no trailing zeros.
fn sig(v: f64) -> String {
    let s = if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A time in µs for people: `250 ns`, `3.2 µs`, `1.5 ms`, `2 s`.
fn human_us(us: f64) -> String {
    if us <= 0.0 {
        "0".into()
    } else if us < 1.0 {
        format!("{} ns", sig(us * 1e3))
    } else if us < 1e3 {
        format!("{} µs", sig(us))
    } else if us < 1e6 {
        format!("{} ms", sig(us / 1e3))
    } else {
        format!("{} s", sig(us / 1e6))
    }
}

/// What a unit's values are plotted as: times in µs, throughputs as they are.
fn kind(unit: &str) -> (&'static str, f64) {
    match unit {
        "ns" => ("time", 1e-3),
        "us" => ("time", 1.0),
        "GB/s" => ("GB/s", 1.0),
        "Mops/s" => ("Mops/s", 1.0),
        _ => ("IO/s", 1.0),
    }
}

fn fmt_value(kind: &str, v: f64) -> String {
    match kind {
        "time" => human_us(v),
        k => format!("{} {k}", sig(v)),
    }
}

/// The size in bytes a row's name ends with (`map_unmap_64KiB`).
fn size_of(label: &str) -> Option<f64> {
    let (n, unit) = label.split_at(label.find(|c: char| !c.is_ascii_digit())?);
    let n: f64 = n.parse().ok()?;
    Some(
        n * match unit {
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            _ => return None,
        },
    )
}

/// One line of a line chart.
struct Series {
    name: String,
    color: RGBColor,
    pts: Vec<(f64, Spread)>,
}

/// A chart's panels, top to bottom.
enum Panel {
    /// Values against x (log x at the points measured).
    Sweep {
        title: String,
        x_desc: String,
        x_bytes: bool,
        kind: &'static str,
        series: Vec<Series>,
    },
    /// ours / baseline against x, with the line at 1.
    Ratio {
        title: String,
        x_bytes: bool,
        pts: Vec<(f64, f64)>,
    },
    /// Horizontal bars of one kind of value.
    Bars {
        title: String,
        kind: &'static str,
        rows: Vec<Bar>,
    },
}

struct Bar {
    label: String,
    ours: Spread,
    base: Option<(String, Spread)>,
    note: String,
}

impl Panel {
    fn height(&self) -> u32 {
        match self {
            Panel::Sweep { .. } => 320,
            Panel::Ratio { .. } => 200,
            Panel::Bars { rows, .. } => {
                let n: usize = rows.iter().map(|r| 1 + r.base.is_some() as usize).sum();
                110 + 26 * n as u32
            }
        }
    }
}

fn bar_of(m: &Measurement) -> (&'static str, Bar) {
    let (k, scale) = kind(m.unit);
    let note = match (m.ratio(), m.added_us()) {
        (Some(r), Some(a)) if !(0.67..=1.5).contains(&r) => {
            format!(
                "×{:.2} ({}{})",
                r,
                if a >= 0.0 { "+" } else { "−" },
                human_us(a.abs())
            )
        }
        (Some(r), _) => format!("×{r:.2}"),
        _ => String::new(),
    };
    (
        k,
        Bar {
            label: m.name.clone(),
            ours: spread(&m.ours, scale),
            base: m
                .baseline
                .as_ref()
                .map(|(n, b)| (format!("vs {n}"), spread(b, scale))),
            note,
        },
    )
}

/// Bar panels for `rows`, one per kind of value, in the order the kinds first appear.
fn bars(suite: &str, rows: &[&Measurement]) -> Vec<Panel> {
    let mut panels: Vec<Panel> = Vec::new();
    for m in rows {
        let (k, b) = bar_of(m);
        match panels
            .iter_mut()
            .find(|p| matches!(p, Panel::Bars { kind, .. } if *kind == k))
        {
            Some(Panel::Bars { rows, .. }) => rows.push(b),
            _ => panels.push(Panel::Bars {
                title: format!(
                    "{suite}: {} (median, p10–p90; ×: ours / baseline)",
                    if k == "time" { "time per operation" } else { k }
                ),
                kind: k,
                rows: vec![b],
            }),
        }
    }
    panels
}

/// The size sweep of `prefix<size>` rows with their baselines: a line chart and the
/// ratio panel. Returns the rows it used.
fn size_sweep<'a>(
    rows: &[&'a Measurement],
    prefix: &str,
    title: &str,
    ours_name: &str,
    base_name: &dyn Fn(&str) -> String,
) -> (Vec<Panel>, Vec<&'a Measurement>) {
    let mut used = Vec::new();
    let (mut ours, mut base, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    let mut bname = String::new();
    let mut k = "time";
    for m in rows {
        let Some(size) = m.name.strip_prefix(prefix).and_then(size_of) else {
            continue;
        };
        let (kk, scale) = kind(m.unit);
        k = kk;
        ours.push((size, spread(&m.ours, scale)));
        if let Some((n, b)) = &m.baseline {
            bname = base_name(n);
            base.push((size, spread(b, scale)));
        }
        if let Some(r) = m.ratio() {
            ratio.push((size, r));
        }
        used.push(*m);
    }
    if ours.len() < 2 {
        return (Vec::new(), Vec::new());
    }
    let mut series = vec![Series {
        name: ours_name.into(),
        color: OURS,
        pts: ours,
    }];
    if !base.is_empty() {
        series.push(Series {
            name: bname,
            color: BASE,
            pts: base,
        });
    }
    let mut panels = vec![Panel::Sweep {
        title: title.into(),
        x_desc: "size".into(),
        x_bytes: true,
        kind: k,
        series,
    }];
    if ratio.len() >= 2 {
        panels.push(Panel::Ratio {
            title: "ours / baseline (1 = the raw kernel operation's cost; compare these, not absolute times)".into(),
            x_bytes: true,
            pts: ratio,
        });
    }
    (panels, used)
}

/// The panels of one suite's chart.
fn panels(suite: &str, rows: &[&Measurement]) -> Vec<Panel> {
    let (mut out, used) = match suite {
        "pin" => size_sweep(
            rows,
            "map_unmap_",
            "map + unmap cost vs size (median, p10–p90)",
            "userptr map_user + drop",
            &|n| {
                if n.starts_with("vfio_") {
                    "raw VFIO_IOMMU_MAP_DMA + UNMAP_DMA".into()
                } else {
                    "raw io_uring register + unregister".into()
                }
            },
        ),
        "vfio" => size_sweep(
            rows,
            "vfio_map_unmap_",
            "VFIO map + unmap cost vs size (median, p10–p90)",
            "VFIO type1 map + unmap",
            &|n| n.to_string(),
        ),
        "ring" => {
            let mut pts: Vec<(f64, Spread)> = Vec::new();
            let mut used = Vec::new();
            for m in rows {
                let b = match m.name.as_str() {
                    "nop_batched" => Some(64.0),
                    n => n
                        .strip_prefix("nop_batch_")
                        .or_else(|| n.strip_prefix("flush_batch_"))
                        .and_then(|b| b.parse().ok()),
                };
                if let Some(b) = b {
                    pts.push((b, spread(&m.ours, 1.0)));
                    used.push(*m);
                }
            }
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let nvme = rows.iter().any(|m| m.name.starts_with("flush_batch_"));
            if pts.len() >= 2 {
                let title = if nvme {
                    "NVMe Flush submit + complete throughput vs batch size"
                } else {
                    "NOP submit + complete throughput vs batch size"
                };
                (
                    vec![Panel::Sweep {
                        title: title.into(),
                        x_desc: "commands per doorbell".into(),
                        x_bytes: false,
                        kind: "Mops/s",
                        series: vec![Series {
                            name: "userptr ring".into(),
                            color: OURS,
                            pts,
                        }],
                    }],
                    used,
                )
            } else {
                (Vec::new(), Vec::new())
            }
        }
        _ => (Vec::new(), Vec::new()),
    };
    let rest: Vec<&Measurement> = rows
        .iter()
        .filter(|m| !used.iter().any(|u| std::ptr::eq(*u, **m)))
        .copied()
        .collect();
    out.extend(bars(suite, &rest));
    out
}

pub fn write(dir: &Path, results: &[Measurement], meta: &Meta) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut suites: Vec<&str> = Vec::new();
    for m in results {
        if !suites.contains(&m.suite) {
            suites.push(m.suite);
        }
    }
    let mut written = Vec::new();
    for suite in suites {
        let rows: Vec<&Measurement> = results.iter().filter(|m| m.suite == suite).collect();
        let ps = panels(suite, &rows);
        if ps.is_empty() {
            continue;
        }
        let path = dir.join(format!("{suite}.svg"));
        draw(&path, suite, &ps, meta).map_err(|e| format!("plotting {}: {e}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

type DrawResult = Result<(), String>;

fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

fn draw(path: &Path, suite: &str, panels: &[Panel], meta: &Meta) -> DrawResult {
    const HEAD: u32 = 44;
    const FOOT: u32 = 44;
    let body: u32 = panels.iter().map(Panel::height).sum();
    let root = SVGBackend::new(path, (WIDTH, HEAD + body + FOOT)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let (head, rest) = root.split_vertically(HEAD);
    let (mut area, foot) = rest.split_vertically(body);
    head.draw_text(
        &format!("userptr bench: {suite}"),
        &("sans-serif", 22).into_font().color(&BLACK),
        (12, 12),
    )
    .map_err(e)?;
    let small = ("sans-serif", 13).into_font().color(&RGBColor(80, 80, 80));
    foot.draw_text(
        &format!(
            "userptr {} · {} · device: {}",
            meta.tool, meta.date, meta.device
        ),
        &small,
        (12, 6),
    )
    .map_err(e)?;
    foot.draw_text(&meta.machine, &small, (12, 24)).map_err(e)?;
    for p in panels {
        let (this, next) = area.split_vertically(p.height());
        match p {
            Panel::Sweep {
                title,
                x_desc,
                x_bytes,
                kind,
                series,
            } => sweep(&this, title, x_desc, *x_bytes, kind, series)?,
            Panel::Ratio {
                title,
                x_bytes,
                pts,
            } => ratio(&this, title, *x_bytes, pts)?,
            Panel::Bars { title, kind, rows } => bar_panel(&this, title, kind, rows)?,
        }
        area = next;
    }
    root.present().map_err(e)
}

fn x_label(x_bytes: bool, v: f64) -> String {
    if x_bytes {
        human_bytes(v.round() as u64)
    } else {
        sig(v)
    }
}

/// Tick marks for a log axis: 1, 2, 5 times the powers of ten within `lo..hi` (only
/// the powers of ten when that is more than a dozen).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut t = Vec::new();
    let mut p = 10f64.powf(lo.log10().floor());
    while p <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = p * m;
            if v >= lo && v <= hi {
                t.push(v);
            }
        }
        p *= 10.0;
    }
    if t.len() > 12 {
        t.retain(|v| (v.log10() - v.log10().round()).abs() < 1e-9);
    }
    t
}

/// Lower and upper ends for a log axis over `vals` (positive).
fn log_bounds(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = vals
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::MAX, 0.0f64), |(a, b), v| (a.min(v), b.max(v)));
    if hi <= 0.0 {
        return (0.1, 10.0);
    }
    (lo / 1.6, hi * 1.6)
}

fn sweep(
    area: &DrawingArea<SVGBackend, Shift>,
    title: &str,
    x_desc: &str,
    x_bytes: bool,
    kind: &str,
    series: &[Series],
) -> DrawResult {
    let xs: Vec<f64> = {
        let mut v: Vec<f64> = series
            .iter()
            .flat_map(|s| s.pts.iter().map(|p| p.0))
            .collect();
        v.sort_by(f64::total_cmp);
        v.dedup();
        v
    };
    let (xlo, xhi) = (xs[0] / 1.5, xs[xs.len() - 1] * 1.5);
    let (ylo, yhi) = log_bounds(
        series
            .iter()
            .flat_map(|s| s.pts.iter().flat_map(|p| [p.1.p10, p.1.p90, p.1.med])),
    );
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (xlo..xhi).log_scale().with_key_points(xs.clone()),
            (ylo..yhi).log_scale().with_key_points(log_ticks(ylo, yhi)),
        )
        .map_err(e)?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 13))
        .x_desc(x_desc)
        .y_desc(if kind == "time" {
            "time (median)".to_string()
        } else {
            format!("{kind} (median)")
        })
        .x_label_formatter(&|v| x_label(x_bytes, *v))
        .y_label_formatter(&|v| fmt_value(kind, *v))
        .draw()
        .map_err(e)?;
    for s in series {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(
                s.pts.iter().map(|p| (p.0, p.1.med)),
                color.stroke_width(2),
            ))
            .map_err(e)?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        chart
            .draw_series(
                s.pts.iter().map(|p| {
                    ErrorBar::new_vertical(p.0, p.1.p10, p.1.med, p.1.p90, color.filled(), 8)
                }),
            )
            .map_err(e)?;
        chart
            .draw_series(
                s.pts
                    .iter()
                    .map(|p| Circle::new((p.0, p.1.med), 3, color.filled())),
            )
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(e)?;
    Ok(())
}

fn ratio(
    area: &DrawingArea<SVGBackend, Shift>,
    title: &str,
    x_bytes: bool,
    pts: &[(f64, f64)],
) -> DrawResult {
    let xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
    let (xlo, xhi) = (xs[0] / 1.5, xs[xs.len() - 1] * 1.5);
    let hi = pts.iter().map(|p| p.1).fold(1.0, f64::max);
    let lo = pts.iter().map(|p| p.1).fold(1.0, f64::min);
    let pad = ((hi - lo) * 0.25).max(0.1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 14))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (xlo..xhi).log_scale().with_key_points(xs.clone()),
            (lo - pad).max(0.0)..hi + pad,
        )
        .map_err(e)?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 12))
        .axis_desc_style(("sans-serif", 13))
        .x_desc("size")
        .y_desc("ratio")
        .x_label_formatter(&|v| x_label(x_bytes, *v))
        .y_label_formatter(&|v| format!("{v:.2}"))
        .draw()
        .map_err(e)?;
    chart
        .draw_series(LineSeries::new(
            [(xlo, 1.0), (xhi, 1.0)],
            BLACK.mix(0.5).stroke_width(1),
        ))
        .map_err(e)?;
    chart
        .draw_series(LineSeries::new(pts.iter().copied(), OURS.stroke_width(2)))
        .map_err(e)?;
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 3, OURS.filled())))
        .map_err(e)?;
    chart
        .draw_series(
            pts.iter().map(|&(x, r)| {
                Text::new(format!("{r:.2}"), (x, r), ("sans-serif", 12).into_font())
            }),
        )
        .map_err(e)?;
    Ok(())
}

fn bar_panel(
    area: &DrawingArea<SVGBackend, Shift>,
    title: &str,
    kind: &str,
    rows: &[Bar],
) -> DrawResult {
    // Categories top to bottom: each figure, then its baseline.
    struct Cat<'a> {
        label: &'a str,
        v: Spread,
        color: RGBColor,
        note: &'a str,
    }
    let mut cats: Vec<Cat> = Vec::new();
    for r in rows {
        cats.push(Cat {
            label: &r.label,
            v: r.ours,
            color: OURS,
            note: &r.note,
        });
        if let Some((n, b)) = &r.base {
            cats.push(Cat {
                label: n,
                v: *b,
                color: BASE,
                note: "",
            });
        }
    }
    let n = cats.len() as i32;
    let vals = || cats.iter().flat_map(|c| [c.v.p10, c.v.p90, c.v.med]);
    let (lo, hi) = log_bounds(vals());
    let log = hi / lo > 20.0 * 1.6 * 1.6;
    let idx = |i: usize| n - 1 - i as i32;
    let labels: Vec<String> = cats.iter().map(|c| c.label.to_string()).collect();
    let ylab = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) if *i >= 0 && *i < n => labels[(n - 1 - i) as usize].clone(),
        _ => String::new(),
    };
    let mut b = ChartBuilder::on(area);
    b.caption(title, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(330);
    let note_font = ("sans-serif", 12).into_font();
    if log {
        let lo = lo / 2.0;
        let mut chart = b
            .build_cartesian_2d(
                (lo..hi * 6.0)
                    .log_scale()
                    .with_key_points(log_ticks(lo, hi * 6.0)),
                (0..n).into_segmented(),
            )
            .map_err(e)?;
        chart
            .configure_mesh()
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .disable_y_mesh()
            .y_labels(n as usize)
            .y_label_formatter(&ylab)
            .x_label_formatter(&|v| fmt_value(kind, *v))
            .x_desc(if kind == "time" {
                "time (log scale)".to_string()
            } else {
                format!("{kind} (log scale)")
            })
            .draw()
            .map_err(e)?;
        for (i, c) in cats.iter().enumerate() {
            let y = idx(i);
            let mut r = Rectangle::new(
                [
                    (lo, SegmentValue::Exact(y)),
                    (c.v.med.max(lo), SegmentValue::Exact(y + 1)),
                ],
                c.color.mix(0.75).filled(),
            );
            r.set_margin(3, 3, 0, 0);
            chart.draw_series([r]).map_err(e)?;
            chart
                .draw_series([ErrorBar::new_horizontal(
                    SegmentValue::CenterOf(y),
                    c.v.p10.max(lo),
                    c.v.med.max(lo),
                    c.v.p90.max(lo),
                    BLACK.stroke_width(1),
                    8,
                )])
                .map_err(e)?;
            let text = format!("{} {}", fmt_value(kind, c.v.med), c.note);
            chart
                .draw_series([Text::new(
                    text,
                    (
                        c.v.p90.max(c.v.med).max(lo) * 1.15,
                        SegmentValue::CenterOf(y),
                    ),
                    note_font.clone(),
                )])
                .map_err(e)?;
        }
    } else {
        let top = hi / 1.6 * 1.45;
        let mut chart = b
            .build_cartesian_2d(0.0..top, (0..n).into_segmented())
            .map_err(e)?;
        chart
            .configure_mesh()
            .label_style(("sans-serif", 12))
            .axis_desc_style(("sans-serif", 13))
            .disable_y_mesh()
            .y_labels(n as usize)
            .y_label_formatter(&ylab)
            .x_label_formatter(&|v| fmt_value(kind, *v))
            .x_desc(if kind == "time" {
                "time".to_string()
            } else {
                kind.to_string()
            })
            .draw()
            .map_err(e)?;
        for (i, c) in cats.iter().enumerate() {
            let y = idx(i);
            let mut r = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(y)),
                    (c.v.med, SegmentValue::Exact(y + 1)),
                ],
                c.color.mix(0.75).filled(),
            );
            r.set_margin(3, 3, 0, 0);
            chart.draw_series([r]).map_err(e)?;
            chart
                .draw_series([ErrorBar::new_horizontal(
                    SegmentValue::CenterOf(y),
                    c.v.p10,
                    c.v.med,
                    c.v.p90,
                    BLACK.stroke_width(1),
                    8,
                )])
                .map_err(e)?;
            let text = format!("{} {}", fmt_value(kind, c.v.med), c.note);
            chart
                .draw_series([Text::new(
                    text,
                    (c.v.p90.max(c.v.med) + top * 0.01, SegmentValue::CenterOf(y)),
                    note_font.clone(),
                )])
                .map_err(e)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_us(0.25), "250 ns");
        assert_eq!(human_us(3.2), "3.2 µs");
        assert_eq!(human_us(1500.0), "1.5 ms");
        assert_eq!(human_bytes(4096), "4 KiB");
        assert_eq!(human_bytes(1 << 30), "1 GiB");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(size_of("64KiB"), Some(65536.0));
    }
}
