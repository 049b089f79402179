//! SVG plots of benchmark results, written as plain markup: a few lines and labels need no
//! plotting library (nor the fonts one would load to measure its labels, which this machine's
//! registries do not ship).

use std::fmt::Write;

/// One line of a panel: `(x, y)` points in x order.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// One chart, sharing the x axis with the others.
pub struct Panel<'a> {
    pub y_label: &'a str,
    pub series: Vec<Series<'a>>,
    /// A dashed horizontal line: a target.
    pub limit: Option<(f64, &'a str)>,
}

const WIDTH: f64 = 860.0;
const PANEL_HEIGHT: f64 = 300.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 50.0;
const GAP: f64 = 60.0;

/// The panels stacked, one x axis (`x_label`) under each, with ticks at round numbers.
pub fn svg(title: &str, x_label: &str, panels: &[Panel<'_>]) -> String {
    let height = TOP + panels.len() as f64 * (PANEL_HEIGHT + GAP);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="28" font-size="16">{}</text>"#,
        escape(title)
    );
    let xs = panels
        .iter()
        .flat_map(|panel| panel.series.iter())
        .flat_map(|series| series.points.iter().map(|(x, _)| *x));
    let x_max = nice_max(xs.fold(0.0, f64::max));
    for (index, panel) in panels.iter().enumerate() {
        let top = TOP + index as f64 * (PANEL_HEIGHT + GAP);
        draw_panel(&mut out, panel, top, x_max, x_label);
    }
    out.push_str("</svg>\n");
    out
}

fn draw_panel(out: &mut String, panel: &Panel<'_>, top: f64, x_max: f64, x_label: &str) {
    let plot_width = WIDTH - LEFT - RIGHT;
    let ys = panel
        .series
        .iter()
        .flat_map(|series| series.points.iter().map(|(_, y)| *y))
        .chain(panel.limit.map(|(y, _)| y));
    let y_max = nice_max(ys.fold(0.0, f64::max));
    let bottom = top + PANEL_HEIGHT;
    let x_at = |x: f64| LEFT + x / x_max * plot_width;
    let y_at = |y: f64| bottom - y / y_max * PANEL_HEIGHT;
    // Grid, ticks and labels.
    for tick in ticks(x_max) {
        let x = x_at(tick);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            bottom + 16.0,
            label(tick)
        );
    }
    for tick in ticks(y_max) {
        let y = y_at(tick);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_width,
            LEFT - 6.0,
            y + 4.0,
            label(tick)
        );
    }
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{top}" width="{plot_width}" height="{PANEL_HEIGHT}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + plot_width / 2.0,
        bottom + 36.0,
        escape(x_label)
    );
    let _ = writeln!(
        out,
        r#"<text transform="translate(20 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + PANEL_HEIGHT / 2.0,
        escape(panel.y_label)
    );
    let legend_x = LEFT + plot_width + 14.0;
    let mut legend_y = top + 14.0;
    if let Some((limit, name)) = panel.limit {
        let y = y_at(limit);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#888" stroke-dasharray="6 4"/>"##,
            LEFT + plot_width
        );
        legend(out, legend_x, legend_y, "#888", name);
        legend_y += 18.0;
    }
    for series in &panel.series {
        let points: Vec<String> = series
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", x_at(*x), y_at(*y)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
            points.join(" "),
            series.color
        );
        for (x, y) in &series.points {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#,
                x_at(*x),
                y_at(*y),
                series.color
            );
        }
        legend(out, legend_x, legend_y, series.color, series.name);
        legend_y += 18.0;
    }
}

fn legend(out: &mut String, x: f64, y: f64, color: &str, name: &str) {
    let _ = writeln!(
        out,
        r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
        x + 18.0,
        x + 24.0,
        y + 4.0,
        escape(name)
    );
}

/// The tick step: 1, 2 or 5 times a power of ten, giving about five ticks up to `max`.
fn step(max: f64) -> f64 {
    let rough = max / 5.0;
    let power = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|step| *step >= rough)
        .unwrap_or(10.0 * power)
}

/// `max` rounded up to a whole tick step (1 when there is nothing to show).
fn nice_max(max: f64) -> f64 {
    if max.is_nan() || max <= 0.0 {
        return 1.0;
    }
    let step = step(max);
    (max / step).ceil() * step
}

fn ticks(max: f64) -> Vec<f64> {
    let step = step(max);
    let count = (max / step).round() as usize;
    (0..=count).map(|i| i as f64 * step).collect()
}

fn label(value: f64) -> String {
    if value >= 1000.0 && value % 1000.0 == 0.0 {
        format!("{}k", value / 1000.0)
    } else if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.3}");
        text.trim_end_matches('0').to_owned()
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_fall_on_round_numbers_covering_the_data() {
        assert_eq!(nice_max(47_300.0), 50_000.0);
        assert_eq!(
            ticks(50_000.0),
            vec![0.0, 10_000.0, 20_000.0, 30_000.0, 40_000.0, 50_000.0]
        );
        assert_eq!(nice_max(23.4), 25.0);
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(label(20_000.0), "20k");
        assert_eq!(label(2.5), "2.5");
    }

    #[test]
    fn every_point_is_drawn_inside_its_panel() {
        let svg = svg(
            "stream <W=2>",
            "offered chunk frames/s",
            &[Panel {
                y_label: "ms",
                series: vec![Series {
                    name: "p99",
                    color: "#c00",
                    points: vec![(10_000.0, 5.0), (40_000.0, 30.0)],
                }],
                limit: Some((25.0, "target")),
            }],
        );
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("stream &lt;W=2&gt;"), "titles are escaped");
        assert_eq!(svg.matches("<circle").count(), 2);
        // x: 40k of a 40k axis is the right edge; y: 30 of a 30 axis is the top.
        let right = LEFT + (WIDTH - LEFT - RIGHT);
        assert!(
            svg.contains(&format!(r#"cx="{right:.1}" cy="{TOP:.1}""#)),
            "{svg}"
        );
    }
}
