//! `--plot DIR`: SVG charts of the figures that have a shape: map+unmap cost against
//! size (ours next to the raw kernel pin: io_uring, or VFIO with `--device`), and
//! NOP (NVMe: Flush) throughput against batch size.

use super::Measurement;
use plotters::prelude::*;
use std::path::Path;

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

pub fn write(dir: &Path, results: &[Measurement]) -> Result<Vec<String>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut written = Vec::new();
    let mut ours = Vec::new();
    let mut raw = Vec::new();
    let mut vfio = false;
    for m in results.iter().filter(|m| m.suite == "pin") {
        let Some(size) = m.name.strip_prefix("map_unmap_").and_then(size_of) else {
            continue;
        };
        ours.push((size, m.ours.median()));
        if let Some((name, b)) = &m.baseline {
            vfio |= name.starts_with("vfio_");
            raw.push((size, b.median()));
        }
    }
    if ours.len() >= 2 {
        let path = dir.join("pin.svg");
        let err = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", path.display());
        let root = SVGBackend::new(&path, (720, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (xmin, xmax) = (ours[0].0 * 0.8, ours[ours.len() - 1].0 * 1.25);
        let ymax = ours.iter().chain(&raw).map(|p| p.1).fold(1.0, f64::max) * 1.5;
        let ymin = ours
            .iter()
            .chain(&raw)
            .map(|p| p.1)
            .fold(f64::MAX, f64::min)
            * 0.6;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "map + unmap cost vs size (reference device)",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((xmin..xmax).log_scale(), (ymin..ymax).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("bytes")
            .y_desc("µs (median)")
            .x_label_formatter(&|v| format!("{:.0}K", v / 1024.0))
            .draw()
            .map_err(|e| err(&e))?;
        for (pts, color, name) in [
            (&ours, RED, "userptr map_user + drop"),
            (
                &raw,
                BLUE,
                if vfio {
                    "raw VFIO_IOMMU_MAP_DMA + UNMAP_DMA"
                } else {
                    "raw io_uring register + unregister"
                },
            ),
        ] {
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        written.push(path.display().to_string());
    }
    let mut ring: Vec<(f64, f64)> = results
        .iter()
        .filter(|m| m.suite == "ring")
        .filter_map(|m| {
            let b = match m.name.as_str() {
                "nop_batched" => 64.0,
                n => n
                    .strip_prefix("nop_batch_")
                    .or_else(|| n.strip_prefix("flush_batch_"))?
                    .parse()
                    .ok()?,
            };
            Some((b, m.ours.median()))
        })
        .collect();
    ring.sort_by(|a, b| a.0.total_cmp(&b.0));
    if ring.len() >= 2 {
        let path = dir.join("ring.svg");
        let err = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", path.display());
        let root = SVGBackend::new(&path, (720, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let ymax = ring.iter().map(|p| p.1).fold(0.0, f64::max) * 1.3;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                if results.iter().any(|m| m.name.starts_with("flush_batch_")) {
                    "NVMe Flush submit + complete throughput vs batch size"
                } else {
                    "NOP submit + complete throughput vs batch size"
                },
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0.8f64..100.0).log_scale(), 0.0..ymax)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("commands per doorbell")
            .y_desc("Mops/s (median)")
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(ring.iter().copied(), RED.stroke_width(2)))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(ring.iter().map(|&p| Circle::new(p, 3, RED.filled())))
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}
