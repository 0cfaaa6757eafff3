//! report.png: throughput, p99 latency and the proxy's CPU per request,
//! per scenario, for each load of the bench.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use plotters::{prelude::*, style::FontStyle};

use super::report::{Run, SCENARIOS};

const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const GROUPS: [(&str, Option<u32>, &str); 5] = [
    ("keepalive", Some(1), "k-a c=1"),
    ("keepalive", Some(16), "k-a c=16"),
    ("keepalive", Some(64), "k-a c=64"),
    ("newconn", Some(1), "new c=1"),
    ("newconn", Some(16), "new c=16"),
];
/// One per scenario, in [`SCENARIOS`] order.
const COLORS: [RGBColor; SCENARIOS.len()] = [
    RGBColor(120, 120, 120),
    RGBColor(31, 119, 180),
    RGBColor(148, 103, 189),
    RGBColor(44, 160, 44),
    RGBColor(23, 190, 207),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
    RGBColor(140, 86, 75),
];

pub fn draw(runs: &[Run], path: &Path) -> Result<()> {
    // plotters draws text with ab_glyph from a font we hand it.
    let font = std::fs::read(FONT_FILE)
        .with_context(|| format!("reading {FONT_FILE} (Debian package fonts-dejavu-core)"))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT_FILE} is not a usable font"))?;

    let root = BitMapBackend::new(path, (2100, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((1, 3));
    panel(
        &panels[0],
        runs,
        "Throughput (requests/s, higher is better)",
        0,
        |r| r.rps,
    )?;
    panel(
        &panels[1],
        runs,
        "p99 latency (ms, lower is better)",
        1,
        |r| r.p99_ms,
    )?;
    panel(
        &panels[2],
        runs,
        "Proxy CPU per request (µs, lower is better)",
        0,
        |r| r.agent_cpu_us_per_req,
    )?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    runs: &[Run],
    title: &str,
    decimals: usize,
    value: impl Fn(&Run) -> Option<f64>,
) -> Result<()> {
    let figure = |scenario: &str, (workload, c, _): (&str, Option<u32>, &str)| {
        runs.iter()
            .find(|r| r.scenario == scenario && r.workload == workload && r.concurrency == c)
            .and_then(&value)
    };
    // Only the scenarios this panel has figures for get bars and a legend
    // entry; each keeps its colour from its place in SCENARIOS.
    let shown: Vec<(usize, &str)> = SCENARIOS
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, s)| GROUPS.iter().any(|g| figure(s, *g).is_some()))
        .collect();
    let max = shown
        .iter()
        .flat_map(|(_, s)| GROUPS.iter().filter_map(|g| figure(s, *g)))
        .fold(0.0_f64, f64::max)
        .max(1e-3);
    let x = 0.0..GROUPS.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(x, 0.0..max * 1.15)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Key points every 0.5: the group names sit at the half-way ones.
        .x_labels(GROUPS.len() * 2 + 1)
        .x_label_formatter(&|x| {
            if (x.fract() - 0.5).abs() > 0.01 {
                return String::new();
            }
            GROUPS
                .get(x.floor() as usize)
                .map_or_else(String::new, |g| g.2.to_owned())
        })
        .y_label_formatter(&|y| format!("{y:.decimals$}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    let width = 0.8 / shown.len().max(1) as f64;
    for (slot, &(si, scenario)) in shown.iter().enumerate() {
        let color = COLORS[si];
        let bars = GROUPS.iter().enumerate().filter_map(|(gi, g)| {
            let v = figure(scenario, *g)?;
            let x0 = gi as f64 + 0.1 + slot as f64 * width;
            Some(Rectangle::new(
                [(x0, 0.0), (x0 + width * 0.95, v)],
                color.filled(),
            ))
        });
        chart
            .draw_series(bars)
            .map_err(plot_err)?
            .label(scenario)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

fn plot_err<E: std::error::Error + Send + Sync + 'static>(
    e: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}
